"""The native kernels' compile flags: `native.compile_flags()` against the same source built without contracted
multiply-adds and AVX-512VL (-O3 and AVX2/FMA only), interleaved in one process, median of `--repeats`.

Times the attention kernel with its fused CRPE term (`native.factor_attention(qkv, heads, scale, crpe)`) and the
CPE convolution (`native.dwconv_tokens`) at each stage of a model at 224 px:

    python benchmarks/native_flags.py --model coat_tiny --batch-sizes 1 16
    python benchmarks/native_flags.py --model coat_lite_tiny --batch-sizes 1 16
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import coatvit
from coatvit import native


def build(flags: list[str], directory: str, name: str) -> ctypes.CDLL:
    path = str(Path(directory) / f"{name}.so")
    subprocess.run([native.compiler(), *flags, "-o", path, str(native.SOURCE)], check=True)
    lib = ctypes.CDLL(path)
    i, n, ptr = ctypes.c_int, ctypes.c_long, ctypes.c_void_p
    lib.factor_attention.argtypes = [ptr, n, n, i, i, i, i, ctypes.c_float, ptr, n, n, ptr, ptr, ptr, i, i, i, i]
    lib.dwconv_tokens.argtypes = [ptr, n, n, ptr, ptr, ptr, i, i, i, i, i, ptr, n, n, ptr, n, n, ptr, n, n, i]
    return lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="coat_tiny")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = native.compile_flags()
    plain = [f for f in flags if f in ("-O3", "-shared", "-fPIC", "-fopenmp", "-std=c99", "-mavx2", "-mfma")]
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}; flags {' '.join(flags)} "
          f"against {' '.join(plain)}")
    torch.manual_seed(0)
    model = coatvit.create_model(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"flags": build(flags, tmp, "flags"), "plain": build(plain, tmp, "plain")}
        print("| batch | stage (C, grid) | attention + CRPE ms: flags / plain | speedup | CPE ms: flags / plain | "
              "speedup |")
        print("|---|---|---|---|---|---|")
        for batch in args.batch_sizes:
            for i in range(4):
                side = 224 // (4 * 2 ** i)
                attn = getattr(model, f"serial_blocks{i + 1}")[0].factoratt_crpe
                crpe = native.depthwise_weights(list(getattr(model, f"crpe{i + 1}").conv_list))
                cpe = native.depthwise_weights([getattr(model, f"cpe{i + 1}").proj])
                C, N = attn.qkv.in_features, 1 + side * side
                qkvs = [torch.randn(batch, N, 3 * C) for _ in range(3)]  # rotated: not all of them stay cached
                x, out, y = torch.randn(batch, N, C), torch.empty(batch, N, C), torch.empty(batch, N, C)
                img, dst = x[:, 1:], y[:, 1:]
                times = {k: ([], []) for k in libs}
                for r in range(args.repeats):
                    for k, lib in libs.items():
                        q = qkvs[r % 3]
                        start = time.perf_counter()
                        lib.factor_attention(q.data_ptr(), q.stride(0), q.stride(1), batch, N, C, attn.num_heads,
                                             attn.scale, out.data_ptr(), out.stride(0), out.stride(1),
                                             crpe.weight.data_ptr(), crpe.bias.data_ptr(),
                                             crpe.block_windows.data_ptr(), crpe.window, side, side, args.threads)
                        middle = time.perf_counter()
                        lib.dwconv_tokens(img.data_ptr(), img.stride(0), img.stride(1), cpe.weight.data_ptr(),
                                          cpe.bias.data_ptr(), cpe.block_windows.data_ptr(), cpe.window, C, batch,
                                          side, side, None, 0, 0, img.data_ptr(), img.stride(0), img.stride(1),
                                          dst.data_ptr(), dst.stride(0), dst.stride(1), args.threads)
                        times[k][0].append(middle - start)
                        times[k][1].append(time.perf_counter() - middle)
                med = {k: [statistics.median(t) * 1e3 for t in v] for k, v in times.items()}
                print(f"| {batch} | {i + 1} ({C}, {side}x{side}) | {med['flags'][0]:.3f} / {med['plain'][0]:.3f} | "
                      f"{med['plain'][0] / med['flags'][0]:.2f}x | {med['flags'][1]:.3f} / {med['plain'][1]:.3f} | "
                      f"{med['plain'][1] / med['flags'][1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
