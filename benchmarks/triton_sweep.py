"""Launch settings of the Triton attention kernels (coatvit.kernels.LAUNCH), timed on a GPU against the eager ops.

    python benchmarks/triton_sweep.py                      (a CUDA GPU; about a minute, most of it compiling)
    python benchmarks/triton_sweep.py --shapes lite-s1 tiny-s1 --batch-size 128

One conv-attention module (qkv projection, CRPE convolutions, attention, output projection) per shape of a CoaT
stage, bf16 autocast: the median milliseconds of an inference forward and of a forward + backward, eager ops vs the
kernels under each launch setting (tokens per block and warps, for the tiled kernels and then for the streaming
ones). Each setting is first checked against the eager ops in fp32 on two images. The last lines give the best
setting per padded head width, as entries of `coatvit.kernels.LAUNCH`.
"""

from __future__ import annotations

import argparse

import torch

from coatvit import kernels
from coatvit.model import ConvRelPosEnc, FactorAttnConvRelPosEnc

# name: (feature-map side, channels, heads); heads of 8, 16, 19, 40 and 64 channels (padded to 16, 16, 32, 64, 64)
SHAPES = {"lite-s1": (56, 64, 8), "lite-s2": (28, 128, 8), "tiny-s1": (56, 152, 8), "tiny-s3": (14, 152, 8),
          "lite-s3": (14, 320, 8), "lite-s4": (7, 512, 8)}
TILES = [(16, 1), (32, 2), (64, 2), (64, 4), (128, 4), (128, 8)]  # (tile_block, tile_warps)
STREAMS = [(32, 2), (64, 4), (128, 4), (256, 8)]  # (stream_block, stream_warps)


def median_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["lite-s1", "tiny-s1", "lite-s3"], choices=list(SHAPES))
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("triton_sweep.py times kernels on a CUDA GPU; none is visible here")
    torch.manual_seed(0)
    for name in args.shapes:
        side, C, h = SHAPES[name]
        D = kernels._padded_width(C // h)
        attn = FactorAttnConvRelPosEnc(C, h).cuda()
        crpe = ConvRelPosEnc(C // h, [(3, 2), (5, 3), (7, 3)]).cuda()
        size = (side, side)
        x = torch.randn(args.batch_size, 1 + side * side, C, device="cuda", requires_grad=True)
        grad = torch.randn(args.batch_size, 1 + side * side, C, device="cuda", dtype=torch.bfloat16)
        small = x.detach()[:2]

        def infer():
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                attn(x, size, crpe)

        def train():
            with torch.autocast("cuda", torch.bfloat16):
                out = attn(x, size, crpe)
            out.backward(grad)

        def timed(use: bool) -> tuple[float, float]:
            kernels.set_enabled(use)
            try:
                return median_ms(infer), median_ms(train)
            finally:
                kernels.set_enabled(None)

        def error() -> float:  # fp32, kernels vs eager ops
            with torch.no_grad():
                kernels.set_enabled(False)
                ref = attn(small, size, crpe)
                kernels.set_enabled(True)
                out = attn(small, size, crpe)
                kernels.set_enabled(None)
            return ((out - ref).norm() / ref.norm()).item()

        eager = timed(False)
        print(f"{name}: batch {args.batch_size}, {1 + side * side} tokens, C {C}, {h} heads of {C // h} (D {D}); "
              f"eager ops: infer {eager[0]:.3f} ms, fwd+bwd {eager[1]:.3f} ms", flush=True)
        results = []
        settings = [kernels.Launch(tile_block=b, tile_warps=w) for b, w in TILES]
        for phase in ("tile", "stream"):
            if phase == "stream":  # streaming settings on top of the best tiled setting for fwd+bwd
                tile = min(results, key=lambda r: r[2])[0]
                settings = [kernels.Launch(b, w, tile.tile_block, tile.tile_warps) for b, w in STREAMS]
            for launch in settings:
                kernels.LAUNCH[D] = launch
                err = error()
                t_infer, t_train = timed(True)
                results.append((launch, t_infer, t_train))
                print(f"  stream {launch.stream_block:3d}x{launch.stream_warps}w  tile {launch.tile_block:3d}x"
                      f"{launch.tile_warps}w: infer {t_infer:7.3f} ms ({eager[0] / t_infer:4.2f}x eager), fwd+bwd "
                      f"{t_train:7.3f} ms ({eager[1] / t_train:4.2f}x eager), fp32 rel. error {err:.1e}", flush=True)
                if not err < 1e-4:
                    raise SystemExit(f"{name}: kernels disagree with the eager ops under {launch} (error {err})")
        kernels.LAUNCH.pop(D)
        for mode, col in (("infer", 1), ("train", 2)):
            launch, *times = min(results, key=lambda r: r[col])
            print(f"best for {name} (D {D}), {mode}: {launch} ({eager[col - 1] / times[col - 1]:.2f}x eager)")


if __name__ == "__main__":
    main()
