"""onnxruntime vs eager PyTorch on the CPU: the same CoaT classifier, the same inputs, timed interleaved.

    python benchmarks/export_speed.py --model coat_lite_tiny --img-size 224 --batch 1 --threads 2

Exports the model (random weights unless --weights; the speed does not depend on them) with `coatvit export`'s
exporter unless --onnx names an existing file, checks the outputs agree, warms both up, then alternates one
PyTorch call and one onnxruntime call `--rounds` times and prints the median, spread and ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import coatvit
from coatvit import export


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="coat_lite_tiny")
    p.add_argument("--weights")
    p.add_argument("--onnx", help="an existing export of the same model and weights (skips the export)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = coatvit.create_model(args.model, weights=args.weights).eval()
    size = (args.img_size, args.img_size)
    onnx_path = Path(args.onnx) if args.onnx else Path(tempfile.mkdtemp()) / f"{args.model}.onnx"
    if not args.onnx:
        start = time.perf_counter()
        export.export_onnx(model, onnx_path, img_size=size)
        print(f"export: {time.perf_counter() - start:.0f} s -> {onnx_path}")

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = torch.randn(args.batch, 3, *size)
    xn = x.numpy()
    with torch.inference_mode():
        diff = float(np.abs(model(x).numpy() - session.run(None, {name: xn})[0]).max())
        for _ in range(args.warmup):
            model(x)
            session.run(None, {name: xn})
        eager, onnx = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            model(x)
            eager.append(time.perf_counter() - t)
            t = time.perf_counter()
            session.run(None, {name: xn})
            onnx.append(time.perf_counter() - t)

    def summary(ts: list[float]) -> dict[str, float]:
        ms = sorted(1000 * t for t in ts)
        return {"median_ms": round(statistics.median(ms), 2), "p10_ms": round(ms[len(ms) // 10], 2),
                "p90_ms": round(ms[(9 * len(ms)) // 10], 2)}

    result = {"model": args.model, "img_size": args.img_size, "batch": args.batch, "threads": args.threads,
              "rounds": args.rounds, "max_abs_diff": diff, "eager": summary(eager), "onnxruntime": summary(onnx),
              "speedup": round(statistics.median(eager) / statistics.median(onnx), 3),
              "torch": torch.__version__, "onnxruntime_version": ort.__version__}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
