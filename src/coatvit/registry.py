"""Model registry: a dict from name to architecture config, and the two functions that read it."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any, Sequence

from .config import PRETRAINED, VARIANTS, CoaTConfig
from .errors import UnknownModelError
from .model import CoaT

_REGISTRY: dict[str, CoaTConfig] = {}


def register_model(name: str, config: CoaTConfig) -> None:
    """Adds a named architecture. Names are unique."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = config


for _name, _config in VARIANTS.items():
    register_model(_name, _config)


def list_models(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """Registered model names matching a shell-style pattern (sorted); `pretrained=True` keeps those with weights."""
    names = sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))
    return [n for n in names if n in PRETRAINED] if pretrained else names


def get_config(name: str) -> CoaTConfig:
    """The architecture config of a registered model; an unknown name suggests the closest ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}: {hint}`coatvit list` shows the {len(_REGISTRY)} available models") from None


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    weights: Any = None,
    num_classes: int | None = None,
    drop_path_rate: float | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    **overrides: Any,
) -> CoaT:
    """Builds a CoaT model by name.

    Args:
        name: a name from `list_models()`.
        pretrained: load the released ImageNet-1k weights (Hugging Face Hub cache first, then the authors' URL).
        weights: a path (or state dict) to load instead: ours, timm's or the authors' format.
        num_classes: classifier size. With weights of another class count, the head is re-initialised: passing
            num_classes is how a user asks for that.
        drop_path_rate: stochastic depth rate (same in every block).
        features_only: return a backbone whose forward gives NCHW maps at strides 4/8/16/32.
        out_indices: the scales a backbone returns.
        **overrides: any other `CoaTConfig` field (e.g. `use_crpe=False`, `parallel_depth=2` for ablations).
    """
    config = get_config(name)
    fields = {f.name for f in dataclasses.fields(CoaTConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"create_model() got unknown options {sorted(unknown)}; valid: {sorted(fields)}")
    changes = dict(overrides)
    if drop_path_rate is not None:
        changes["drop_path_rate"] = drop_path_rate
    state = None
    if weights is not None or pretrained:
        from . import weights as weights_io  # weights I/O sits above the model in the data flow

        source = weights if weights is not None else weights_io.download_pretrained(name)
        state = source if isinstance(source, dict) else weights_io.read_state_dict(source)
        file_classes = weights_io.head_classes(state)
        if num_classes is None and file_classes is not None:
            changes["num_classes"] = file_classes  # the file decides unless the user chose
    if num_classes is not None:
        changes["num_classes"] = num_classes
    model = CoaT(dataclasses.replace(config, **changes), features_only=features_only, out_indices=out_indices)
    if state is not None:
        weights_io.load_weights(model, state, reset_head=num_classes is not None)
    model.pretrained_entry = PRETRAINED.get(name) if pretrained else None
    model.model_name = name
    return model
