"""The CRPE term in the native attention kernel's output pass against a second pass after it.

In CPU float32 inference the factorized attention's products run as one native kernel (`native.factor_attention`)
and the CRPE's Q * DWConv(V) is added to its output natively too: fused, in the kernel's output pass, each row of the
grid right after its products (`FactorAttnConvRelPosEnc.fused_crpe`, the default), or as a second pass over the
tokens (`native.dwconv_tokens`) that reads q, v and the output again. This script times whole models both ways,
interleaved in one process, tuned allocator, median of `--repeats`; inference at the given batch and batch-1
latency:

    python benchmarks/crpe_fusion.py --models coat_lite_tiny:16 coat_tiny:16 --modes infer latency
"""

from __future__ import annotations

from coatvit.model import FactorAttnConvRelPosEnc

import _ab


def set_fused(on: bool | None) -> None:
    FactorAttnConvRelPosEnc.fused_crpe = True if on is None else on


def time_both(name: str, mode: str, batch: int, size: int, repeats: int) -> dict[bool, list[float]]:
    return _ab.time_switch(name, mode, batch, size, repeats, set_fused)


def main() -> None:
    parser = _ab.parser(__doc__.splitlines()[0], ["coat_lite_tiny:16", "coat_tiny:16"], repeats=7)
    parser.add_argument("--modes", nargs="+", default=["infer", "latency"], choices=["infer", "latency"])
    args = parser.parse_args()
    models = _ab.start(args)
    _ab.print_ab_table(models, args.modes, time_both, args.repeats, args.img_size, on="fused", off="second pass")


if __name__ == "__main__":
    main()
