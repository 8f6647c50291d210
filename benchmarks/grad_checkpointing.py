"""Activation memory a training step keeps with and without gradient checkpointing.

Counts the bytes autograd saves for backward (parameters excluded, each storage once) through
`coatvit.memory.saved_activation_bytes`; the figure does not depend on the machine's load. The peak RSS of a
whole training step (weights, gradients and AdamW state included) comes from
`coatvit benchmark --modes train --vs ours-ckpt timm`.

    python benchmarks/grad_checkpointing.py --models coat_lite_tiny coat_tiny --batch-size 16 --img-size 224
"""

from __future__ import annotations

import argparse

import torch

import coatvit
from coatvit.memory import saved_activation_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["coat_lite_tiny", "coat_tiny"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()
    print("| model | batch | input | saved activations (MiB) | with checkpointing (MiB) | reduction |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = coatvit.create_model(name).train()
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
        plain = saved_activation_bytes(model, x)
        model.set_grad_checkpointing(True)
        ckpt = saved_activation_bytes(model, x)
        print(f"| {name} | {args.batch_size} | {args.img_size} | {plain / 2**20:.0f} | {ckpt / 2**20:.0f} "
              f"| {plain / ckpt:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
