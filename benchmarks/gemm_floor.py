"""How much of a CPU forward pass is matrix products and convolutions, ours and timm's: the floor under the time.

Records every matrix product (aten addmm / mm / bmm, `out=` overloads included) and every convolution of one
inference forward pass with a TorchDispatchMode, replays each distinct call alone on fresh tensors of the same
shapes and strides (median of `--replays`, times its number of calls), and sets the sums beside the whole forward
pass (ours and timm's interleaved, median of `--repeats`). What is left is everything else: norms, GELU, softmax,
the attention's head permutes, adds, concatenations and resizes, i.e. the part a faster implementation can shrink
without faster GEMMs. Tuned allocator (no page faults on either side), so the table is about arithmetic and memory
passes; in a plain process timm also pays its page faults (BENCHMARKS.md, "Where the CPU lead comes from").

A product replayed alone finds its operands in cache more often than inside the model, so the floor is a slight
underestimate; read it to about +-10%. Our linear layers run through PyTorch's products here, as timm's do
(`coatvit.onednn` off: its opaque weights cannot be replayed this way).

    python benchmarks/gemm_floor.py --models coat_tiny:16 coat_lite_tiny:16 coat_lite_tiny:1
"""

from __future__ import annotations

import collections
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from coatvit import onednn
from coatvit.benchmark import BenchmarkConfig, build_model, time_interleaved

import _ab

aten = torch.ops.aten
GEMMS = {aten.addmm, aten.mm}
PRODUCTS = {aten.bmm, aten.baddbmm}
CONVS = {aten.convolution}


def kind(func) -> str | None:
    packet = func.overloadpacket
    if packet in GEMMS:
        return "linear GEMMs"
    if packet in PRODUCTS:
        return "attention products"
    if packet in CONVS:
        return "convolutions"
    return None


def spec(value):
    """A hashable description of one argument: tensors by shape, strides and dtype, the rest as they are."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(spec(v) for v in value))
    return ("value", value)


def build(s):
    """A fresh argument from its description: random values in the same layout."""
    if s[0] == "tensor":
        _, shape, stride, dtype = s
        t = torch.empty_strided(shape, stride, dtype=dtype)
        if t.numel():
            t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,)).normal_()
        return t
    if s[0] in ("list", "tuple"):
        items = [build(v) for v in s[1]]
        return items if s[0] == "list" else tuple(items)
    return s[1]


class Recorder(TorchDispatchMode):
    """Counts the products and convolutions of the calls run under it, by (op, argument layouts)."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kind(func) is not None:
            self.calls[(func, spec(args), spec(tuple(sorted(kwargs.items()))))] += 1
        return func(*args, **kwargs)


def replay_ms(calls: collections.Counter, replays: int) -> dict[str, float]:
    """Milliseconds per forward pass of each kind of call, each distinct call timed alone."""
    totals: dict[str, float] = collections.defaultdict(float)
    with torch.no_grad():
        for (func, arg_spec, kwarg_spec), count in calls.items():
            args = build(arg_spec)
            kwargs = dict(build(kwarg_spec))
            func(*args, **kwargs)
            times = []
            for _ in range(replays):
                start = time.perf_counter()
                func(*args, **kwargs)
                times.append(time.perf_counter() - start)
            totals[kind(func)] += statistics.median(times) * count * 1e3
    return totals


def main() -> None:
    parser = _ab.parser(__doc__.splitlines()[0], ["coat_tiny:16", "coat_lite_tiny:16", "coat_lite_tiny:1"],
                        repeats=5)
    parser.add_argument("--replays", type=int, default=7, help="timed runs of each distinct product alone")
    args = parser.parse_args()
    models = _ab.start(args)
    onednn.set_enabled(False)
    kinds = ("linear GEMMs", "attention products", "convolutions")
    print("| model | batch | impl | forward ms | " + " | ".join(f"{k} ms" for k in kinds)
          + " | everything else ms | products + convs share | forward if everything else took no time |")
    print("|---|---|---|---|" + "---|" * (len(kinds) + 3))
    for name, batch in models:
        cfg = BenchmarkConfig(model=name, batch_size=batch, img_size=(args.img_size, args.img_size),
                              repeats=args.repeats, steps=10 if batch == 1 else 2, warmup=1)
        contenders = {impl: build_model(impl, cfg).eval() for impl in ("ours", "timm")}
        x = torch.randn(batch, 3, args.img_size, args.img_size)

        def forward(model):
            # no_grad rather than inference_mode: composite ops (linear, matmul, conv2d) then decompose before the
            # recorder sees them, so it records the products themselves, not the copies around them
            with torch.no_grad():
                model(x)

        times = time_interleaved({impl: (lambda m=m: forward(m)) for impl, m in contenders.items()}, cfg)
        for impl, model in contenders.items():
            recorder = Recorder()
            with recorder:
                forward(model)
            parts = replay_ms(recorder.calls, args.replays)
            total = statistics.median(times[impl]) * 1e3
            floor = sum(parts[k] for k in kinds)
            speedup = total / max(floor, 1e-9)
            print(f"| {name} | {batch} | {impl} | {total:.1f} | " + " | ".join(f"{parts[k]:.1f}" for k in kinds)
                  + f" | {total - floor:.1f} | {100 * floor / total:.0f}% | {floor:.1f} ({speedup:.2f}x faster) |",
                  flush=True)


if __name__ == "__main__":
    main()
