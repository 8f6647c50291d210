"""Weight files: read (ours, timm's, the authors'), map onto the model strictly, save, and fetch pretrained ones.

Safety: nothing here unpickles arbitrary objects. `.pth`/`.bin` files go through `torch.load(weights_only=True)`,
which refuses any pickled global that is not a tensor or a plain container; safetensors files hold no code at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .atomic import atomic_write
from .config import PRETRAINED, CoaTConfig
from .errors import PretrainedUnavailableError, WeightsError

StateDict = dict[str, torch.Tensor]

# Keys of the authors' checkpoints and timm's `.pth` files that name a shared module through a block
# (coat-spec section 4). Each maps to the one place our model keeps that tensor.
_ALIASES = [
    (re.compile(r"^serial_blocks(\d)\.\d+\.cpe\.(.+)$"), r"cpe\1.\2"),
    (re.compile(r"^serial_blocks(\d)\.\d+\.factoratt_crpe\.crpe\.(.+)$"), r"crpe\1.\2"),
    (re.compile(r"^parallel_blocks\.\d+\.factoratt_crpe(\d)\.crpe\.(.+)$"), r"crpe\1.\2"),
    (re.compile(r"^parallel_blocks\.(\d+)\.mlp[34]\.(.+)$"), r"parallel_blocks.\1.mlp2.\2"),
]
_DROPPABLE = ("norm2", "norm3", "norm4", "aggregate", "head")
_WRAPPER_KEYS = ("model", "state_dict", "module")


# ------------------------------------------------------------------------------------------------------------
# reading


def _torch_load(path: Path) -> Any:
    import argparse

    try:
        # argparse.Namespace appears in training checkpoints (saved args); rebuilding one runs no code.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"refused to load {path}: it holds pickled objects other than tensors and plain containers "
            f"({_unpickler_reason(str(e))}), and unpickling those can run code; nothing in it was executed. "
            f"Re-save the state dict from a trusted environment, preferably as .safetensors") from None
    except Exception as e:  # noqa: BLE001 - bytes from outside: any parse failure is the file's fault, not ours
        raise WeightsError(
            f"cannot read {path}: the file is truncated or not a PyTorch checkpoint ({type(e).__name__}); "
            f"download or copy it again") from None


def read_torch_file(path: str | os.PathLike) -> Any:
    """Reads a PyTorch `.pth`/`.bin`/`.pt` file (zip or legacy) with `torch.load(weights_only=True)`: tensors and
    plain containers only, no code runs.

    Raises:
        WeightsError: the file is missing, empty, truncated, corrupt, or holds pickled objects of other types.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist; check the path")
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"{path} is empty (0 bytes): the write, download or copy was cut; use another copy")
    with open(path, "rb") as f:
        zipped = f.read(2) == b"PK"
    if zipped and not zipfile.is_zipfile(path):
        raise WeightsError(
            f"cannot read {path}: the PyTorch zip archive is truncated (no end-of-archive record in its {size} bytes); "
            f"download or copy it again")
    return _torch_load(path)


def _unpickler_reason(message: str) -> str:
    """The one useful clause of torch's weights-only refusal (which global or opcode it met), without ANSI codes."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)
    found = re.search(r"unsupported global:? (?:GLOBAL )?(\S+)", message, re.IGNORECASE)
    if found:
        return f"it asks for the global {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    if found:
        return " ".join(found.group(1).split())[:120]
    return " ".join(message.split())[:120] or "unsupported pickle content"


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _safetensors_header_cut(head: bytes, size: int) -> bool:
    # A safetensors file cut inside its JSON header: the announced header length runs past the end of the file.
    n = int.from_bytes(head[:8], "little")
    return size - 8 < n < 1 << 27 and head[8:9] == b"{"


def read_weights(path: str | os.PathLike) -> tuple[StateDict, dict[str, Any]]:
    """Reads a weight file; returns (state dict, metadata).

    Accepts safetensors, PyTorch zip and legacy files, plain state dicts or dicts wrapping one under 'model' /
    'state_dict' (the authors' format, our training checkpoints). Metadata holds what the file says of itself
    (our files: 'config', 'model_name', 'class_names').
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist; check the path")
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"weight file {path} is empty (0 bytes): the download or copy was cut; fetch it again")
    with open(path, "rb") as f:
        head = f.read(16)
    meta: dict[str, Any] = {}
    if size < 16:
        raise WeightsError(
            f"weight file {path} is only {size} bytes long: the download or copy was cut; fetch it again")
    if head[:2] == b"PK" or head[:1] == b"\x80":
        obj = read_torch_file(path)
    elif _looks_like_safetensors(head, size):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = f.metadata() or {}
                obj = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(
                f"cannot read {path}: the safetensors file is truncated or corrupt ({e}); fetch it again") from None
        for k, v in raw_meta.items():
            if k.startswith("coatvit."):
                meta[k.removeprefix("coatvit.")] = json.loads(v)
    elif _safetensors_header_cut(head, size):
        raise WeightsError(
            f"cannot read {path}: the safetensors file is truncated (its header alone announces "
            f"{int.from_bytes(head[:8], 'little')} bytes, the file has {size}); fetch it again")
    else:
        raise WeightsError(
            f"{path} is not a weight file: expected safetensors or a PyTorch .pth/.bin checkpoint, "
            f"got bytes {head[:8]!r}")
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, expected a state dict (a mapping of tensors)")
    for key in ("config", "model_name", "class_names"):
        if key in obj and not isinstance(obj[key], torch.Tensor):
            meta[key] = obj[key]
    return unwrap_state_dict(obj, source=str(path)), meta


def read_state_dict(path: str | os.PathLike) -> StateDict:
    return read_weights(path)[0]


def unwrap_state_dict(obj: Mapping[str, Any], source: str = "state dict") -> StateDict:
    """Finds the tensor mapping inside a checkpoint dict and strips DDP / torch.compile prefixes."""
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{source} holds no tensors under {_WRAPPER_KEYS} or at the top level")
    out = {}
    for k, v in tensors.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def head_classes(state: Mapping[str, Any]) -> int | None:
    """Number of classes of the classifier in a state dict, or None when it has none."""
    state = unwrap_state_dict(state) if not all(isinstance(v, torch.Tensor) for v in state.values()) else state
    w = state.get("head.weight")
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim == 2 else None


# ------------------------------------------------------------------------------------------------------------
# mapping onto a model


def _describe(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def canonicalize_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module, *, reset_head: bool = False,
                            identify: bool = True) -> StateDict:
    """Maps any supported checkpoint onto `model`'s own keys, checking every key and shape.

    - alias keys of shared modules (CPE, CRPE, the parallel blocks' shared MLP) fold onto the one tensor we keep;
      two aliases with different values are an error;
    - the authors' unused final norms (`norm1` always, `norm2`/`norm3` of Lite models) are dropped, and so are the
      final norms and classifier when `model` is a features_only backbone;
    - with `reset_head`, a classifier of another shape is dropped (the model keeps its freshly initialised one).

    Raises:
        WeightsError naming missing keys, unexpected keys and shape conflicts.
    """
    state = unwrap_state_dict(state)
    expected = model.state_dict()
    out: StateDict = {}
    for key, value in state.items():
        for pattern, repl in _ALIASES:
            if pattern.match(key):
                key = pattern.sub(repl, key)
                break
        if key in out:
            if out[key].shape != value.shape or not torch.equal(out[key], value):
                raise WeightsError(f"checkpoint has different values for aliases of the shared tensor {key}")
            continue
        out[key] = value
    for key in list(out):
        top = key.split(".")[0]
        # Released files carry final norms (and heads) that a Lite model or a backbone does not have.
        if key not in expected and (top == "norm1" or (top in _DROPPABLE and getattr(model, top, None) is None)):
            del out[key]
    shape_conflicts = [
        f"{k} {tuple(out[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in out if k in expected and out[k].shape != expected[k].shape
    ]
    if reset_head and shape_conflicts:
        for k in [k for k in out if k.startswith("head.")]:
            del out[k]
        shape_conflicts = [c for c in shape_conflicts if not c.startswith("head.")]
    missing = sorted(set(expected) - set(out))
    if reset_head:
        missing = [k for k in missing if not k.startswith("head.")]
    unexpected = sorted(set(out) - set(expected))
    if missing or unexpected or shape_conflicts:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_describe(unexpected)}")
        if shape_conflicts:
            parts.append(f"shape conflicts: {_describe(shape_conflicts, 4)}")
        if shape_conflicts and not missing and not unexpected and all(c.startswith("head.") for c in shape_conflicts):
            raise WeightsError("weights do not fit the model: " + "; ".join(parts) + "; the classifier differs: "
                               "pass num_classes (CLI: --num-classes) to re-initialise it")
        names = identify_variants(state) if identify else []  # the file as read: `out` lost keys this model lacks
        if names:
            raise WeightsError(f"weights do not fit the model: they are {' / '.join(names)} weights "
                               f"({len(missing)} keys missing, {len(unexpected)} unexpected, {len(shape_conflicts)} "
                               f"shape conflicts here); build that model instead (CLI: --model {names[0]})")
        raise WeightsError("weights do not fit the model: " + "; ".join(parts)
                           + "; check that the file was made for this model name")
    return out


def identify_variants(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the registered variants whose backbone the state dict fits (the classifier may differ); built on
    the meta device, so this costs no memory. Used to tell a user which model a mismatched file was made for."""
    from .registry import create_model, list_models

    names = []
    for name in list_models():
        with torch.device("meta"):
            candidate = create_model(name)
        try:
            canonicalize_state_dict(state, candidate, reset_head=True, identify=False)
        except WeightsError:
            continue
        names.append(name)
    return names


def load_weights(model: nn.Module, path_or_state_dict: Any, *, reset_head: bool = False) -> nn.Module:
    """Loads weights strictly into `model` (in place) and returns it.

    Args:
        model: a CoaT model (classifier or features_only backbone).
        path_or_state_dict: a file path in any supported format, or a state dict.
        reset_head: keep the model's own classifier when the file's has another shape.
    """
    if isinstance(path_or_state_dict, Mapping):
        state = path_or_state_dict
    else:
        state = read_state_dict(path_or_state_dict)
    state = canonicalize_state_dict(state, model, reset_head=reset_head)
    full = model.state_dict()
    full.update(state)
    model.load_state_dict(full, strict=True)
    return model


# ------------------------------------------------------------------------------------------------------------
# saving


def unwrap_model(model: nn.Module) -> nn.Module:
    """The raw module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_weights(model: nn.Module, path: str | os.PathLike, *, class_names: list[str] | None = None) -> Path:
    """Saves the model's weights atomically: safetensors unless the suffix is .pth/.pt/.bin.

    The file carries the architecture config (and class names when given), so `coatvit predict --weights FILE`
    rebuilds the model without being told its shape.
    """
    model = unwrap_model(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {}
    config = getattr(model, "config", None)
    if isinstance(config, CoaTConfig):
        meta["config"] = config.to_dict()
    if getattr(model, "model_name", None):
        meta["model_name"] = model.model_name
    if class_names is not None:
        meta["class_names"] = list(class_names)
    path = Path(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        return atomic_write(path, lambda tmp: torch.save({"model": state, **meta}, tmp))
    from safetensors.torch import save_file

    str_meta = {"format": "pt", **{f"coatvit.{k}": json.dumps(v) for k, v in meta.items()}}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=str_meta))


# ------------------------------------------------------------------------------------------------------------
# pretrained weights


def _hf_cache_dir() -> str:
    # Read the environment at call time so a cache chosen after import (tests, notebooks) is honoured.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def _url_cache_dir() -> Path:
    return Path(os.environ.get("COATVIT_CACHE") or Path.home() / ".cache" / "coatvit")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "COATVIT_OFFLINE"))


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_url(url: str, dst: str) -> None:
    """Downloads `url` to `dst` (kept as a function so tests can replace the network)."""
    torch.hub.download_url_to_file(url, dst, progress=False)


def fetch_checked(url: str, dst: Path, sha256_prefix: str) -> Path:
    """Downloads `url` to `dst` atomically; a file whose sha256 does not start with the prefix is deleted."""
    atomic_write(dst, lambda tmp: _fetch_url(url, tmp))
    digest = sha256_of(dst)
    if sha256_prefix and not digest.startswith(sha256_prefix):
        dst.unlink()
        raise WeightsError(
            f"downloaded {url} but its sha256 {digest[:16]}... does not start with the expected {sha256_prefix}; "
            f"the file was deleted. Retry, or download it yourself and pass --weights PATH")
    return dst


def download_pretrained(name: str) -> str:
    """Path of the released weights of `name`: HF Hub cache, then HF Hub download, then the authors' URL.

    Raises:
        PretrainedUnavailableError when none of them can be had (offline and not cached).
    """
    entry = PRETRAINED.get(name)
    if entry is None:
        raise PretrainedUnavailableError(
            f"no pretrained weights are released for {name!r}; models with weights: {', '.join(sorted(PRETRAINED))}")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cache_dir = _hf_cache_dir()
    files = ("model.safetensors", "pytorch_model.bin")
    for filename in files:
        cached = try_to_load_from_cache(entry.hub_id, filename, cache_dir=cache_dir)
        if isinstance(cached, str) and os.path.isfile(cached):
            return cached
    url_file = _url_cache_dir() / Path(entry.url).name
    if url_file.is_file() and sha256_of(url_file).startswith(entry.sha256_prefix):
        return str(url_file)
    errors = []
    if not _offline():
        for filename in files:
            try:
                return hf_hub_download(entry.hub_id, filename, cache_dir=cache_dir)
            except Exception as e:  # noqa: BLE001 - any hub failure falls through to the next source
                errors.append(f"hub {filename}: {type(e).__name__}")
        try:
            return str(fetch_checked(entry.url, url_file, entry.sha256_prefix))
        except WeightsError:
            raise
        except Exception as e:  # noqa: BLE001
            errors.append(f"authors' URL: {type(e).__name__}")
    why = "; ".join(errors) if errors else "offline mode (HF_HUB_OFFLINE/COATVIT_OFFLINE) is set"
    raise PretrainedUnavailableError(
        f"pretrained weights for {name} are not available: no {entry.hub_id}/model.safetensors in the cache "
        f"{cache_dir} and no {url_file} ({why}). Download model.safetensors from "
        f"https://huggingface.co/{entry.hub_id} or {entry.url} and pass weights=PATH (CLI: --weights PATH)")
