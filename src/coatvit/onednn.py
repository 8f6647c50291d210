"""CPU inference's linear layers through oneDNN, with each weight reordered once.

PyTorch runs a float32 `nn.Linear` on a CPU through MKL's sgemm, which packs panels of the weight on every call.
PyTorch also ships oneDNN (the `mkldnn` ops that torch.compile's CPU backend calls): its GEMMs are generated at run
time for the machine's vector unit, take a weight reordered once into their blocked layout, and can finish a tile
with a GELU or a residual sum before it leaves cache. CoaT's projections and MLPs take them in CPU inference
(`coatvit.model.onednn_linear`); the products are the same, summed in another order (outputs within about 1e-6
relative of MKL's). Measured in BENCHMARKS.md (benchmarks/onednn_linear.py).

When: float32 CPU tensors with nothing for autograd to record, outside graph capture and autocast, the layers
called as built, products of at least `MIN_MACS` multiply-adds (below that oneDNN's fixed cost per call, about
20 us, loses to MKL), PyTorch built with oneDNN and its ops present, and `COATVIT_ONEDNN` not 0/false/no/off
(`set_enabled` overrides it). A call that fails warns once, naming the error and `COATVIT_ONEDNN=0`; the layers
then run as themselves for the rest of the process.

The reordered weights are kept per layer (a weak mapping, so a model can still be copied or pickled: oneDNN's
opaque tensors can be neither) until the weight changes in place or is replaced; they cost one more copy of the
linear weights' memory (coat_lite_tiny: at most 21 MB) while the model runs inference.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch
from torch import nn

from . import runtime

ENV = "COATVIT_ONEDNN"
MIN_MACS = 1 << 22  # rows x in x out of a product worth oneDNN's call (benchmarks/onednn_linear.py --sweep)
PACK_ROWS = 1024  # the row count oneDNN picks the weight layout for (packed for 64-2048, products timed alike)

_enabled: bool | None = None  # None: follow the environment variable
_failure: str | None = None
_packed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> ((data_ptr, version), weight)


def set_enabled(enabled: bool | None) -> None:
    """Turns the oneDNN layers on or off for this process (None: follow `COATVIT_ONEDNN` again)."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return not runtime.env_switched_off(ENV)


def available() -> bool:
    """Whether the oneDNN layers may run in this process: on, not failed, and PyTorch has the ops."""
    return enabled() and _failure is None and _ops_present()


@functools.cache
def _ops_present() -> bool:
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


def worth_it(rows: int, layer: nn.Linear) -> bool:
    """Whether a product of `rows` rows through `layer` is big enough for oneDNN (`MIN_MACS`)."""
    return rows * layer.in_features * layer.out_features >= MIN_MACS


def packed_weight(layer: nn.Linear) -> torch.Tensor | None:
    """The layer's weight in oneDNN's layout, kept until the weight changes; None for an inference tensor (it has
    no version counter to tell a change by) or where the reorder fails."""
    weight = layer.weight
    if weight.is_inference():
        return None
    key = (weight.data_ptr(), weight._version)
    kept = _packed.get(layer)
    if kept is None or kept[0] != key:
        with torch.no_grad():
            packed = _call(torch.ops.mkldnn._reorder_linear_weight, weight.detach(), PACK_ROWS)
        if packed is None:
            return None
        kept = _packed[layer] = (key, packed)
    return kept[1]


def linear(x: torch.Tensor, layer: nn.Linear, gelu: str | None = None,
           add: torch.Tensor | None = None) -> torch.Tensor | None:
    """layer(x), then GELU(approximate=`gelu`) where given, then + `add` (a tensor of the output's shape) where given,
    in one oneDNN call (not both); None where it cannot run (the caller runs the layer itself)."""
    if gelu is not None and add is not None:
        raise ValueError("onednn.linear takes a GELU or a residual, not both")
    weight = packed_weight(layer)
    if weight is None:
        return None
    if add is not None:
        return _call(torch.ops.mkldnn._linear_pointwise.binary, x, add, weight, layer.bias, "add")
    if gelu is not None:
        return _call(torch.ops.mkldnn._linear_pointwise, x, weight, layer.bias, "gelu", [], gelu)
    return _call(torch.ops.mkldnn._linear_pointwise, x, weight, layer.bias, "none", [], "")


def _call(op, *args) -> torch.Tensor | None:
    global _failure
    try:
        return op(*args)
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            raise
        _failure = " ".join(str(e).split())[:300] or type(e).__name__
        warnings.warn(f"coatvit: oneDNN's linear layer failed ({_failure}); PyTorch's layers run from now on "
                      f"(set {ENV}=0 to skip oneDNN)", RuntimeWarning, stacklevel=3)
        return None
