"""Training-memory measurements that work on any device, the CPU included."""

from __future__ import annotations

import torch
from torch import nn


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of activations autograd keeps for the backward pass of `model(x)` (parameters excluded).

    Counted through saved-tensor hooks, each storage once. With gradient checkpointing the blocks' insides are
    recomputed in backward instead of being stored, which this figure shows directly.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(storages.values())
