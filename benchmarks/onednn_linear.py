"""oneDNN's linear layers against PyTorch's (MKL) in CPU inference: each CoaT product alone, then whole models.

`--sweep` times one product per (rows, in, out) of CoaT's layers, interleaved, median of `--repeats`: nn.Linear
(MKL), oneDNN with the weight reordered once, and the two fused forms the models use (fc1 + GELU, fc2 + residual)
against their eager pairs. Its small-row columns show where oneDNN's fixed cost per call loses, which sets
`onednn.MIN_MACS`. Without `--sweep`, each model runs with `coatvit.onednn` on and off (`onednn.set_enabled`),
interleaved in one process (the allocator as `coatvit benchmark` leaves it: glibc's default), inference at the
given batch and batch-1 latency:

    python benchmarks/onednn_linear.py --sweep
    python benchmarks/onednn_linear.py --models coat_lite_tiny:16 coat_tiny:16
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from coatvit import onednn

import _ab

# (in, out) of CoaT's products: Lite stages' qkv, fc1, fc2 and CoaT's (152 channels)
LAYERS = [(64, 192), (64, 512), (512, 64), (128, 1024), (1024, 128), (320, 1280), (1280, 320), (152, 456),
          (152, 608), (608, 152)]
ROWS = [1, 8, 32, 50, 256, 2048]


def best_of(fn, repeats: int, calls: int) -> float:
    """Median over `repeats` of the mean time of `calls` calls, in microseconds."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def sweep(repeats: int) -> None:
    print("| rows | in | out | MACs | nn.Linear us | oneDNN us | speedup | Linear+GELU us | fused us | "
          "Linear+add us | fused us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for cin, cout in LAYERS:
        layer = nn.Linear(cin, cout)
        for rows in ROWS:
            x, res = torch.randn(rows, cin), torch.randn(rows, cout)
            calls = max(5, min(200, (1 << 26) // (rows * cin * cout)))
            with torch.inference_mode():
                t = [best_of(f, repeats, calls) for f in (
                    lambda: layer(x), lambda: onednn.linear(x, layer),
                    lambda: F.gelu(layer(x)), lambda: onednn.linear(x, layer, gelu="none"),
                    lambda: layer(x).add_(res), lambda: onednn.linear(x, layer, add=res))]
            print(f"| {rows} | {cin} | {cout} | {rows * cin * cout / 1e6:.2f}M | {t[0]:.1f} | {t[1]:.1f} | "
                  f"{t[0] / t[1]:.2f}x | {t[2]:.1f} | {t[3]:.1f} | {t[4]:.1f} | {t[5]:.1f} |", flush=True)


def time_both(name: str, mode: str, batch: int, size: int, repeats: int) -> dict[bool, list[float]]:
    return _ab.time_switch(name, mode, batch, size, repeats, onednn.set_enabled)


def main() -> None:
    parser = _ab.parser(__doc__.splitlines()[0], ["coat_lite_tiny:16", "coat_tiny:16"], repeats=7)
    parser.add_argument("--modes", nargs="+", default=["infer", "latency"], choices=["infer", "latency"])
    parser.add_argument("--sweep", action="store_true", help="time the products alone instead of whole models")
    args = parser.parse_args()
    models = _ab.start(args, tune_allocator=False)
    if not onednn.available():
        raise SystemExit("oneDNN's linear ops are not available in this PyTorch build")
    if args.sweep:
        sweep(args.repeats)
        return
    _ab.print_ab_table(models, args.modes, time_both, args.repeats, args.img_size, on="oneDNN on", off="off")


if __name__ == "__main__":
    main()
