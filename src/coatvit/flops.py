"""Multiply-accumulate counts, the unit the paper's "GFLOPs" column uses."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


# fvcore (which the paper's and timm's numbers come from) also counts LayerNorm at 5 ops per element with an
# affine transform and bilinear resizing at 4 per output element; torch's counter skips both. Counted here as
# 2x "FLOPs" because FlopCounterMode reports 2 per MAC and we halve its total.
def _layer_norm_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * 5 * math.prod(input_shape)


def _bilinear_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * 4 * math.prod(out_shape)


def count_macs(model: nn.Module, img_size: tuple[int, int], in_chans: int = 3) -> int:
    """MACs of one forward pass of one image: matmuls, convolutions, LayerNorm and bilinear resizing, counted
    like fvcore (the paper's "GFLOPs"). Run on a meta-device model it allocates nothing. The reference path is
    counted on every device: the fast path computes the same equations with other operations.
    """
    fast = getattr(model, "fast_path", None)
    if fast:
        model.set_fast_path(False)
    try:
        return _count(model, img_size, in_chans)
    finally:
        if fast:
            model.set_fast_path(True)


def _count(model: nn.Module, img_size: tuple[int, int], in_chans: int) -> int:
    device = next(model.parameters()).device
    x = torch.empty(1, in_chans, *img_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping={
        aten.native_layer_norm: _layer_norm_flops,
        aten.upsample_bilinear2d: _bilinear_flops,
        aten.upsample_bilinear2d.vec: _bilinear_flops,
    })
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2
