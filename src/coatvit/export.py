"""Export a CoaT classifier or backbone to ONNX (torch.export-based exporter) or a `.pt2` ExportedProgram, check
the result against eager PyTorch, and run an exported ONNX classifier without any PyTorch model code.

The ONNX graph has a dynamic batch, height and width: CoaT runs at any input size (at least `min_input_size`
pixels per side), so one file serves every resolution. The evaluation preprocessing (input size, crop, mean/std)
and the class names travel in the ONNX metadata, which is all `predict_onnx` needs next to onnxruntime.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write
from .errors import CoaTError

FORMATS = ("onnx", "pt2", "tflite")
LITERT_PYTHON_ENV = "COATVIT_LITERT_PYTHON"  # the interpreter of the LiteRT environment (see litert.py)
TFLITE_TOLERANCE = 1e-4
ONNX_TOLERANCE = 1e-4  # fp32: the exported graph must match eager PyTorch to this max abs difference


class ExportError(CoaTError):
    """An export failed, or the exported file does not reproduce the eager model."""


@dataclass(frozen=True)
class ExportCheck:
    """The exported file against eager PyTorch on one random input."""

    batch: int
    height: int
    width: int
    max_abs_diff: float

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "height": self.height, "width": self.width, "max_abs_diff": self.max_abs_diff}


# ------------------------------------------------------------------------------------------------------------
# model to export


def build_export_model(model_name: str | None, *, weights: str | None = None, pretrained: bool = False,
                       features: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The eval-mode model to export and the metadata the exported file carries.

    A classifier comes from `evaluate.load_inference_model` (the same weights, preprocessing and class names that
    `coatvit predict` would use); with `features`, a backbone returning four NCHW maps.
    """
    if weights is None and not pretrained:
        raise ValueError("export needs weights: pass --weights PATH or --pretrained")
    if weights is not None and pretrained:
        raise ValueError("pass either --weights PATH or --pretrained, not both")
    if features:
        from .registry import create_model

        if model_name is None:
            raise ValueError("--features needs --model NAME")
        model = create_model(model_name, weights=weights, pretrained=pretrained, features_only=True).eval()
        return model, {"model_name": model_name, "features": True}
    from .evaluate import load_inference_model

    inf = load_inference_model(model_name=model_name, weights=weights, pretrained=pretrained)
    meta = {"model_name": inf.model_name, "features": False, **inf.data_config.to_dict(),
            "class_names": list(inf.class_names)}
    return inf.model.eval(), meta


def _example_input(model: nn.Module, img_size: tuple[int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.config.in_chans, *img_size, generator=g)


def _output_names(model: nn.Module) -> list[str]:
    if getattr(model, "features_only", False):
        return [f"features_s{info['reduction']}" for info in model.feature_info]
    return ["logits"]


def _check_size(model: nn.Module, img_size: tuple[int, int]) -> None:
    # Export traces at this size; a 1-token last scale would let the tracer specialise broadcasting on size 1.
    need = 2 * model.config.min_input_size
    if min(img_size) < need:
        raise ValueError(f"export traces at {img_size[0]}x{img_size[1]}, which is too small: use --img-size of at "
                         f"least {need} (the exported graph still accepts inputs down to "
                         f"{model.config.min_input_size} px)")


# ------------------------------------------------------------------------------------------------------------
# ONNX


def export_onnx(model: nn.Module, path: str | os.PathLike, *, img_size: tuple[int, int],
                metadata: dict[str, Any] | None = None, optimize: bool = True) -> Path:
    """Exports `model` with torch.export + the ONNX exporter; batch, height and width are dynamic.

    Args:
        model: an eval-mode CoaT classifier or features_only backbone.
        path: output `.onnx` file (written atomically).
        img_size: (H, W) of the example input that is traced (at least twice `min_input_size`).
        metadata: plain-data entries stored as JSON strings in the ONNX metadata (`coatvit.<key>`).
        optimize: run the exporter's graph optimizer (constant folding, fusion).
    """
    _check_size(model, img_size)
    dyn = torch.export.Dim.DYNAMIC
    x = _example_input(model, img_size)
    try:
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: dyn, 2: dyn, 3: dyn}})
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=["images"],
                                         output_names=_output_names(model), optimize=optimize, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; the user needs the one line
        raise ExportError(f"ONNX export of {getattr(model, 'model_name', 'the model')} failed: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    proto = onnx_program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"coatvit.{key}", json.dumps(value)

    def write(tmp: str) -> None:
        import onnx

        onnx.save_model(proto, tmp)

    return atomic_write(path, write)


def onnx_session(path: str | os.PathLike):
    """An onnxruntime CPU session for `path`."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} does not exist; make one with `coatvit export --format onnx`")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0][:200]}; "
                          f"is it an ONNX file written by `coatvit export`?") from None


def _flat(outputs: Any) -> list[np.ndarray]:
    if isinstance(outputs, torch.Tensor):
        return [outputs.detach().numpy()]
    return [t.detach().numpy() for t in outputs]


def check_onnx(model: nn.Module, path: str | os.PathLike, *, sizes: Sequence[tuple[int, int]],
               batches: Sequence[int] = (1, 3), tolerance: float = ONNX_TOLERANCE) -> list[ExportCheck]:
    """Runs the ONNX file in onnxruntime and eager PyTorch at every (batch, size) pair.

    Raises:
        ExportError when any output differs by more than `tolerance`.
    """
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    checks = []
    for size in sizes:
        for batch in batches:
            x = _example_input(model, size, batch=batch, seed=batch * 1000 + size[0])
            with torch.no_grad():
                expected = _flat(model(x))
            got = session.run(None, {name: x.numpy()})
            diff = max(float(np.abs(e - g).max()) for e, g in zip(expected, got, strict=True))
            checks.append(ExportCheck(batch, size[0], size[1], diff))
    _raise_if_off(checks, tolerance, path)
    return checks


def _raise_if_off(checks: list[ExportCheck], tolerance: float, path: str | os.PathLike) -> None:
    bad = [c for c in checks if not math.isfinite(c.max_abs_diff) or c.max_abs_diff > tolerance]
    if bad:
        worst = max(bad, key=lambda c: c.max_abs_diff if math.isfinite(c.max_abs_diff) else math.inf)
        raise ExportError(f"{path} does not reproduce the eager model: max abs diff {worst.max_abs_diff:.3g} at "
                          f"batch {worst.batch}, {worst.height}x{worst.width} (tolerance {tolerance:g}); "
                          f"the file was kept for inspection")


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `coatvit.*` metadata entries of an exported ONNX file."""
    session = onnx_session(path)
    props = session.get_modelmeta().custom_metadata_map
    return {k.removeprefix("coatvit."): json.loads(v) for k, v in props.items() if k.startswith("coatvit.")}


# ------------------------------------------------------------------------------------------------------------
# torch.export (.pt2)


def export_pt2(model: nn.Module, path: str | os.PathLike, *, img_size: tuple[int, int]) -> Path:
    """Saves a `torch.export` ExportedProgram (dynamic batch, height, width) to a `.pt2` file."""
    _check_size(model, img_size)
    dyn = torch.export.Dim.DYNAMIC
    x = _example_input(model, img_size)
    try:
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: dyn, 2: dyn, 3: dyn}})
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                          ) from e

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: torch.export.save only accepts names ending in .pt2
            torch.export.save(program, f)

    return atomic_write(path, write)


def check_pt2(model: nn.Module, path: str | os.PathLike, *, sizes: Sequence[tuple[int, int]],
              batches: Sequence[int] = (1, 3), tolerance: float = ONNX_TOLERANCE) -> list[ExportCheck]:
    """Loads the `.pt2` file back (`torch.export.load`, no pickled code) and compares it with eager PyTorch."""
    program = torch.export.load(str(path)).module()
    checks = []
    for size in sizes:
        for batch in batches:
            x = _example_input(model, size, batch=batch, seed=batch * 1000 + size[0])
            with torch.no_grad():
                expected, got = _flat(model(x)), _flat(program(x))
            diff = max(float(np.abs(e - g).max()) for e, g in zip(expected, got, strict=True))
            checks.append(ExportCheck(batch, size[0], size[1], diff))
    _raise_if_off(checks, tolerance, path)
    return checks


# ------------------------------------------------------------------------------------------------------------
# LiteRT (TFLite), in its own environment


def litert_python() -> Path:
    """The interpreter of the LiteRT environment: $COATVIT_LITERT_PYTHON, else ../litert-venv next to the checkout.

    Raises:
        ExportError saying how to create the environment when there is none.
    """
    configured = os.environ.get(LITERT_PYTHON_ENV)
    path = Path(configured) if configured else Path(__file__).resolve().parents[3] / "litert-venv" / "bin" / "python"
    if not path.is_file():
        raise ExportError(
            f"no LiteRT environment at {path}: litert-torch needs torch < 2.14, so it gets its own venv. Create it "
            f"with `python3.11 -m venv ../litert-venv && ../litert-venv/bin/pip install torch==2.13.0 "
            f"litert-torch==0.10.0 safetensors numpy` and/or set {LITERT_PYTHON_ENV} to its python")
    return path


def export_tflite(*, model_name: str, output: str | os.PathLike, weights: str | None, pretrained: bool,
                  features: bool, img_size: tuple[int, int], tolerance: float = TFLITE_TOLERANCE
                  ) -> list[ExportCheck]:
    """Converts with litert-torch in the LiteRT environment (static shape, batch 1) and checks the .tflite file
    in the LiteRT interpreter against eager PyTorch (in that environment)."""
    import subprocess

    python = litert_python()
    src = str(Path(__file__).resolve().parents[1])
    cmd = [str(python), "-m", "coatvit.litert", "--model", model_name, "--output", str(output),
           "--img-size", str(img_size[0]), str(img_size[1])]
    if weights:
        cmd += ["--weights", str(Path(weights).resolve())]
    if pretrained:
        cmd.append("--pretrained")
    if features:
        cmd.append("--features")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportError(f"LiteRT conversion failed in {python}: {tail[:300]}")
    report = json.loads(lines[-1])
    checks = [ExportCheck(c["batch"], c["height"], c["width"], c["max_abs_diff"]) for c in report["checks"]]
    _raise_if_off(checks, tolerance, output)
    return checks


# ------------------------------------------------------------------------------------------------------------
# one call for the CLI


def check_sizes(img_size: tuple[int, int], min_size: int) -> list[tuple[int, int]]:
    """The two resolutions an export is checked at: the traced one and a different, non-square one."""
    h, w = img_size
    other = (max(min_size, h + 32), max(min_size, w + 64))
    return [(h, w), other]


def export_model(*, model_name: str | None, output: str | os.PathLike, fmt: str = "onnx", weights: str | None = None,
                 pretrained: bool = False, features: bool = False, img_size: tuple[int, int] | None = None,
                 optimize: bool = True) -> dict[str, Any]:
    """Builds the model, exports it, checks the file against eager PyTorch and returns a report.

    Returns:
        {'output', 'format', 'model', 'features', 'seconds', 'checks': [{batch, height, width, max_abs_diff}, ...],
        'max_abs_diff'}.
    """
    from .config import DEFAULT_INPUT_SIZE

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model, meta = build_export_model(model_name, weights=weights, pretrained=pretrained, features=features)
    size = img_size or tuple(meta.get("input_size") or DEFAULT_INPUT_SIZE.get(meta["model_name"], (224, 224)))
    sizes = check_sizes(size, 2 * model.config.min_input_size)
    start = time.perf_counter()
    if fmt == "onnx":
        export_onnx(model, output, img_size=size, metadata=meta, optimize=optimize)
        checks = check_onnx(model, output, sizes=sizes)
    elif fmt == "pt2":
        export_pt2(model, output, img_size=size)
        checks = check_pt2(model, output, sizes=sizes)
    else:
        checks = export_tflite(model_name=meta["model_name"], output=output, weights=weights, pretrained=pretrained,
                               features=features, img_size=size)
    return {"output": str(output), "format": fmt, "model": meta["model_name"], "features": features,
            "seconds": round(time.perf_counter() - start, 1), "checks": [c.to_dict() for c in checks],
            "max_abs_diff": max(c.max_abs_diff for c in checks)}


# ------------------------------------------------------------------------------------------------------------
# inference from an ONNX file alone (no PyTorch model code)


def preprocess_numpy(image, meta: dict[str, Any]) -> np.ndarray:
    """A PIL image -> (3, H, W) float32, the same steps as `data.eval_transform` with PIL and numpy only."""
    from PIL import Image

    h, w = meta["input_size"]
    crop_pct = float(meta.get("crop_pct", 1.0))
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                "nearest": Image.Resampling.NEAREST}[meta.get("interpolation", "bicubic")]
    sh, sw = math.floor(h / crop_pct), math.floor(w / crop_pct)
    iw, ih = image.size
    if meta.get("crop_mode", "center") == "squash" or h != w:
        new_w, new_h = sw, sh
    elif iw <= ih:  # shorter side to sh, aspect kept (torchvision's Resize(int) rule)
        new_w, new_h = sh, int(sh * ih / iw)
    else:
        new_w, new_h = int(sh * iw / ih), sh
    image = image.resize((new_w, new_h), resample)
    top, left = int(round((new_h - h) / 2.0)), int(round((new_w - w) / 2.0))
    image = image.crop((left, top, left + w, top + h))
    x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    x = (x - np.asarray(meta["mean"], np.float32)) / np.asarray(meta["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def predict_onnx(onnx_path: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, topk: int = 5,
                 batch_size: int = 8) -> tuple[list[dict[str, Any]], list[str]]:
    """Classifies image files (or folders of them) with an exported ONNX classifier through onnxruntime.

    Returns:
        (records, skipped) in the format of `evaluate.predict`: {path, topk: [{class, index, prob}]} per image.
    """
    from .errors import DataError
    from .evaluate import collect_images
    from .images import open_image

    if topk <= 0:
        raise ValueError(f"--topk must be positive, got {topk}")
    session = onnx_session(onnx_path)
    meta = {k.removeprefix("coatvit."): json.loads(v)
            for k, v in session.get_modelmeta().custom_metadata_map.items() if k.startswith("coatvit.")}
    if "input_size" not in meta:
        raise ExportError(f"{onnx_path} has no coatvit preprocessing metadata; export it with "
                          f"`coatvit export --format onnx`")
    if meta.get("features"):
        raise ExportError(f"{onnx_path} is a features-only backbone; predict needs a classifier export")
    labels = meta.get("class_names") or []
    input_name = session.get_inputs()[0].name
    paths = collect_images(inputs)
    records: list[dict[str, Any]] = []
    skipped: list[str] = []
    for start in range(0, len(paths), batch_size):
        batch, names = [], []
        for p in paths[start:start + batch_size]:
            try:
                batch.append(preprocess_numpy(open_image(p), meta))
                names.append(p)
            except DataError as e:
                print(f"warning: skipping {e}", file=sys.stderr, flush=True)
                skipped.append(str(e))
        if not batch:
            continue
        logits = session.run(None, {input_name: np.stack(batch)})[0].astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(topk, probs.shape[1])
        for path, p in zip(names, probs):
            order = np.argsort(-p, kind="stable")[:k]
            records.append({"path": str(path), "topk": [
                {"class": labels[c] if c < len(labels) else str(int(c)), "index": int(c), "prob": float(p[c])}
                for c in order]})
    return records, skipped
