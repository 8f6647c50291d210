"""LiteRT (TFLite) export through litert-torch, run inside its own environment.

litert-torch pins torch < 2.14, so it cannot live in the project's environment. `export.export_tflite` runs this
module as `python -m coatvit.litert ...` with that environment's interpreter and this source tree on PYTHONPATH;
it converts the model at one static input size, writes the .tflite file, runs it in the LiteRT interpreter next to
eager PyTorch and prints a JSON report (max abs diff) on its last line.

Install the environment (outside the repository; torch 2.13.0's CPU wheel):

    python3.11 -m venv ../litert-venv
    ../litert-venv/bin/pip install torch==2.13.0 litert-torch==0.10.0 safetensors numpy
    export COATVIT_LITERT_PYTHON=$PWD/../litert-venv/bin/python   # optional when it is ../litert-venv
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch


def convert(*, model_name: str, output: str, weights: str | None, pretrained: bool, features: bool,
            img_size: tuple[int, int]) -> dict:
    """Converts, writes and checks one model; returns the report."""
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter

    from .registry import create_model

    model = create_model(model_name, weights=weights, pretrained=pretrained, features_only=features).eval()
    x = torch.randn(1, model.config.in_chans, *img_size, generator=torch.Generator().manual_seed(0))
    edge = litert_torch.convert(model, (x,))
    edge.export(output)
    interpreter = Interpreter(model_path=output)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x.numpy())
    interpreter.invoke()
    got = [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
    with torch.no_grad():
        expected = model(x)
    expected = [expected.numpy()] if isinstance(expected, torch.Tensor) else [t.numpy() for t in expected]
    # Output order of a multi-output TFLite model is not guaranteed: match outputs by shape.
    diffs = []
    for e in expected:
        candidates = [g for g in got if g.shape == e.shape]
        if not candidates:
            raise RuntimeError(f"the .tflite file has no output of shape {e.shape}")
        diffs.append(min(float(np.abs(e - g).max()) for g in candidates))
    return {"checks": [{"batch": 1, "height": img_size[0], "width": img_size[1], "max_abs_diff": max(diffs)}]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coatvit.litert")
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--weights")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--features", action="store_true")
    p.add_argument("--img-size", type=int, nargs=2, required=True)
    args = p.parse_args(argv)
    report = convert(model_name=args.model, output=args.output, weights=args.weights, pretrained=args.pretrained,
                     features=args.features, img_size=tuple(args.img_size))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
