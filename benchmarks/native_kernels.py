"""The native CPU kernels (`coatvit.native`) against the eager ops the fast path runs without them, per stage of
224-px inputs, inference, interleaved, median of repeats.

    python benchmarks/native_kernels.py --models coat_lite_tiny coat_tiny --batch-sizes 1 6 --repeats 7
    python benchmarks/native_kernels.py --tables mlp --batch-sizes 1 16  # one table

CPE: x + DWConv3x3(x) written after the class token. CRPE: out[:, 1:] += Q * DWConv(V), q and v read from a
(B, N, 3C) projection output; its time excludes the copy that gives each call a fresh `out`. Attention: a serial
block's conv-attention module without CRPE (qkv projection, attention products, output projection), the products
as one native kernel (`native.factor_attention`) against the eager ops: softmax, head permutes and batched
products where heads are 18+ channels wide, else one masked (C x C) product per image. The model's blocks run
a few images at a time at large batches (`coatvit.model.images_per_chunk`: 6 images in stage 1 of coat_lite_tiny at
224 px), hence batch 6 beside batch 1. Co-scale mix (models with parallel blocks): a parallel block's three sums
x_s + a_s + resize(a_t) + resize(a_u) (`ParallelBlock.add_mix`), one native pass per scale against the resizes,
concatenations and adds; its blocks take the whole batch, so batch 16 is the one to add for it. Training: CPE
and CRPE's DWConv(V) forward and backward (input, weight and bias gradients; v a view of a qkv projection that
requires grad) through `coatvit.model.DepthwiseTokens` against PyTorch's convolutions (`DepthwiseTokens.enabled`),
and the attention module forward and backward through `coatvit.model.NativeFactorAttention` against the eager
products (`NativeFactorAttention.enabled`). MLP: a serial block's x + MLP(norm2(x)) with its exact GELU as the
native kernels (`native.gelu`; in training also `native.gelu_backward_`, the derivative and the GELU from one erf)
against PyTorch's (`Mlp.native_gelu`), inference in cache-sized chunks and training forward+backward
(`ChunkedMlp`); the GELU alone on one chunk (2048 x 512) in ns per value.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import coatvit
from coatvit import native
from coatvit.model import DepthwiseTokens, Mlp, NativeFactorAttention


def time_ms(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1e3


def stages(model, img_size: int):
    """Per stage of `model` at img_size px: index, channels, tokens (with the class token), grid, CPE and CRPE."""
    cfg = model.config
    for i in range(4):
        side = img_size // (cfg.patch_size * 2 ** i)
        yield (i, cfg.embed_dims[i], side * side + 1, (side, side), getattr(model, f"cpe{i + 1}"),
               getattr(model, f"crpe{i + 1}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["coat_lite_tiny", "coat_tiny"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 6])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tables", nargs="+", choices=["modules", "mix", "training", "mlp"],
                        default=["modules", "mix", "training", "mlp"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit(f"the native kernels are unavailable here: {native.failure()}")
    print(f"torch {torch.__version__}, {args.threads} threads, {args.img_size} px, median of {args.repeats}")
    if "modules" in args.tables:
        modules_table(args)
    if "mix" in args.tables:
        mix_table(args)
    if "training" in args.tables:
        training_table(args)
    if "mlp" in args.tables:
        mlp_table(args)


def modules_table(args) -> None:
    """CPE, CRPE and the attention module per stage, inference, native against eager."""
    print("| model | batch | stage (C, grid) | CPE native / eager ms | speedup | CRPE native / eager ms | speedup "
          "| attention native / eager ms | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = coatvit.create_model(name).eval()
        for batch in args.batch_sizes:
            for i, C, N, size, cpe, crpe in stages(model, args.img_size):
                side = size[0]
                x = torch.randn(batch, N, C)
                qkv = torch.randn(batch, N, 3 * C)
                q, _, v = qkv.unflatten(-1, (3, C)).unbind(2)
                out = torch.randn(batch, N, C)
                fresh = out.clone()
                steps = max(3, 60 // batch)
                attn = getattr(model, f"serial_blocks{i + 1}")[0].factoratt_crpe
                samples = {on: {key: [] for key in ("cpe", "crpe", "copy", "attn")} for on in (True, False)}
                with torch.no_grad():
                    for r in range(args.repeats):
                        for on in ((True, False) if r % 2 == 0 else (False, True)):
                            native.set_enabled(on)
                            cpe(x, size), crpe.add_to(fresh.copy_(out), q, v, size)  # warm-up
                            samples[on]["cpe"].append(time_ms(lambda: cpe(x, size), steps))
                            samples[on]["crpe"].append(time_ms(lambda: crpe.add_to(fresh.copy_(out), q, v, size),
                                                               steps))
                            samples[on]["copy"].append(time_ms(lambda: fresh.copy_(out), steps))
                            samples[on]["attn"].append(time_ms(lambda: attn(x, size, None), steps))
                native.set_enabled(None)
                med = {on: {k: statistics.median(v) for k, v in s.items()} for on, s in samples.items()}
                cpe_n, cpe_e = med[True]["cpe"], med[False]["cpe"]
                crpe_n = med[True]["crpe"] - med[True]["copy"]
                crpe_e = med[False]["crpe"] - med[False]["copy"]
                print(f"| {name} | {batch} | {i + 1} ({C}, {side}x{side}) | {cpe_n:.3f} / {cpe_e:.3f} | "
                      f"{cpe_e / cpe_n:.2f}x | {crpe_n:.3f} / {crpe_e:.3f} | {crpe_e / crpe_n:.2f}x | "
                      f"{med[True]['attn']:.3f} / {med[False]['attn']:.3f} | "
                      f"{med[False]['attn'] / med[True]['attn']:.2f}x |")


def mix_table(args) -> None:
    """The co-scale mix of one parallel block (`ParallelBlock.add_mix`, all three scales) for the models that have
    parallel blocks: one native pass per scale against the eager resizes, concatenations and sums."""
    print("\n| model | batch | grids | co-scale mix native / eager ms | speedup |")
    print("|---|---|---|---|---|")
    for name in args.models:
        model = coatvit.create_model(name).eval()
        cfg = model.config
        if not cfg.parallel_depth:
            continue
        block = model.parallel_blocks[0]
        sizes = [(args.img_size // (cfg.patch_size * 2 ** i),) * 2 for i in (1, 2, 3)]
        for batch in args.batch_sizes:
            xs = [torch.randn(batch, 1 + h * w, cfg.embed_dims[1]) for h, w in sizes]
            attn = [torch.randn_like(x) for x in xs]
            steps = max(3, 60 // batch)
            samples = {True: [], False: []}
            with torch.no_grad():
                for r in range(args.repeats):
                    for on in ((True, False) if r % 2 == 0 else (False, True)):
                        native.set_enabled(on)
                        block.add_mix(xs, attn, sizes)  # warm-up
                        samples[on].append(time_ms(lambda: block.add_mix(xs, attn, sizes), steps))
            native.set_enabled(None)
            n, e = statistics.median(samples[True]), statistics.median(samples[False])
            grids = ", ".join(f"{h}x{w}" for h, w in sizes)
            print(f"| {name} | {batch} | {grids} | {n:.3f} / {e:.3f} | {e / n:.2f}x |")


def switch_training_kernels(on: bool) -> None:
    DepthwiseTokens.enabled = NativeFactorAttention.enabled = on


def switch_gelu(on: bool) -> None:
    Mlp.native_gelu = on


def interleaved(runs: dict, switch, repeats: int, steps: int) -> dict:
    """Median ms of each of `runs` with switch(True) (native) and switch(False), interleaved in alternating order;
    leaves the switch on."""
    samples = {on: {key: [] for key in runs} for on in (True, False)}
    for r in range(repeats):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            switch(on)
            for key, run in runs.items():
                run()  # warm-up
                samples[on][key].append(time_ms(run, steps))
    switch(True)
    return {on: {k: statistics.median(v) for k, v in s.items()} for on, s in samples.items()}


def row(med: dict) -> str:
    """'native / eager | speedup' cells of each run in `med` (as `interleaved` returns it)."""
    return " | ".join(f"{med[True][k]:.3f} / {med[False][k]:.3f} | {med[False][k] / med[True][k]:.2f}x"
                      for k in med[True]) + " |"


def training_table(args) -> None:
    """CPU training, forward and backward: CPE (x + DWConv(x) with the class row) and CRPE's DWConv(V) through
    `DepthwiseTokens` against PyTorch's convolutions; a serial block's attention module without CRPE through
    `NativeFactorAttention` against the eager products."""
    print("\n| model | batch | stage (C, grid) | CPE fwd+bwd native / eager ms | speedup "
          "| CRPE conv fwd+bwd native / eager ms | speedup | attention fwd+bwd native / eager ms | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = coatvit.create_model(name).train()
        for batch in args.batch_sizes:
            for i, C, N, size, cpe, crpe in stages(model, args.img_size):
                side = size[0]
                attn = getattr(model, f"serial_blocks{i + 1}")[0].factoratt_crpe
                x = torch.randn(batch, N, C, requires_grad=True)
                qkv = torch.randn(batch, N, 3 * C, requires_grad=True)
                v = qkv.unflatten(-1, (3, C))[:, :, 2]
                grads = torch.randn(batch, N, C), torch.randn(batch, N - 1, C)
                steps = max(2, 24 // batch)
                runs = {"cpe": lambda: cpe(x, size).backward(grads[0]),
                        "crpe": lambda: crpe.conv_tokens(v, size).backward(grads[1]),
                        "attn": lambda: attn(x, size, None).backward(grads[0])}
                med = interleaved(runs, switch_training_kernels, args.repeats, steps)
                print(f"| {name} | {batch} | {i + 1} ({C}, {side}x{side}) | " + row(med))


def mlp_table(args) -> None:
    """A serial block's MLP sub-layer per stage, the GELU native or PyTorch's (`Mlp.native_gelu`): inference
    (`Mlp.residual_in_chunks`) and training forward+backward (`ChunkedMlp`); then the GELU kernels alone."""
    print("\n| model | batch | stage (C, hidden) | MLP inference native / eager GELU ms | speedup "
          "| MLP fwd+bwd native / eager GELU ms | speedup |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        model = coatvit.create_model(name)
        for batch in args.batch_sizes:
            for i, C, N, size, _, _ in stages(model, args.img_size):
                block = getattr(model, f"serial_blocks{i + 1}")[0]
                x = torch.randn(batch, N, C)
                x_grad = x.clone().requires_grad_()
                grad = torch.randn(batch, N, C)
                steps = max(2, 24 // batch)

                def infer():
                    with torch.no_grad():
                        block.mlp.residual_in_chunks(x, block.norm2)

                runs = {"infer": infer,
                        "train": lambda: block.mlp.residual(x_grad, block.norm2, block.drop_path, True).backward(grad)}
                med = interleaved(runs, switch_gelu, args.repeats, steps)
                print(f"| {name} | {batch} | {i + 1} ({C}, {block.mlp.hidden_features}) | " + row(med))
    h, g0 = torch.randn(2048, 512) * 2, torch.randn(2048, 512)
    g, act = torch.empty_like(g0), torch.empty_like(h)
    runs = {"GELU: native.gelu / aten.gelu": (lambda: native.gelu(h, out=act),
                                              lambda: torch.ops.aten.gelu.out(h, out=act)),
            "GELU backward and GELU: native.gelu_backward_ / aten pair": (
                lambda: native.gelu_backward_(h, g.copy_(g0), act),
                lambda: (torch.ops.aten.gelu.out(h, out=act),
                         torch.ops.aten.gelu_backward.grad_input(g.copy_(g0), h, grad_input=g))),
            "the gradient's copy (in both above)": (lambda: g.copy_(g0), lambda: g.copy_(g0))}
    print("\n| one chunk (2048 x 512) | native ns per value | PyTorch ns per value | speedup |")
    print("|---|---|---|---|")
    for key, pair in runs.items():
        samples = ([], [])
        for r in range(args.repeats):
            for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                pair[k]()  # warm-up
                samples[k].append(time_ms(pair[k], 20) * 1e6 / h.numel())
        n, e = statistics.median(samples[0]), statistics.median(samples[1])
        print(f"| {key} | {n:.3f} | {e:.3f} | {e / n:.2f}x |")


if __name__ == "__main__":
    main()
