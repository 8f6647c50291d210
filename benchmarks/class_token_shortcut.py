"""The class-token shortcut: the last block computes only the class-token rows a token-pooling classifier reads.

`CoaT.forward` skips the image tokens' q, output projection, CRPE, resizes and MLP in the last block (serial
block 4 of a Lite model, the last parallel block of CoaT) when the head pools the class token
(`CoaT.class_token_shortcut`). This script times the model with and without it (`CoaT.shortcut_last_block`),
interleaved in one process, tuned allocator, median of `--repeats`; inference at the given batch, batch-1 latency
and training steps (forward, cross-entropy, backward, AdamW):

    python benchmarks/class_token_shortcut.py --models coat_lite_tiny:16 coat_tiny:16 --modes infer latency train
"""

from __future__ import annotations

from coatvit.model import CoaT

import _ab


def set_shortcut(on: bool | None) -> None:
    CoaT.shortcut_last_block = True if on is None else on


def time_both(name: str, mode: str, batch: int, size: int, repeats: int) -> dict[bool, list[float]]:
    return _ab.time_switch(name, mode, batch, size, repeats, set_shortcut)


def main() -> None:
    parser = _ab.parser(__doc__.splitlines()[0], ["coat_lite_tiny:16", "coat_tiny:16"], repeats=7)
    parser.add_argument("--modes", nargs="+", default=["infer", "latency", "train"],
                        choices=["infer", "latency", "train"])
    args = parser.parse_args()
    models = _ab.start(args)
    _ab.print_ab_table(models, args.modes, time_both, args.repeats, args.img_size, on="with shortcut", off="without")


if __name__ == "__main__":
    main()
