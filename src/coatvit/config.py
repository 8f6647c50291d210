"""Architecture configuration of the CoaT family and its variant table.

The table follows Table 1 of the paper (Xu et al., "Co-Scale Conv-Attentional Image Transformers", ICCV 2021)
and the authors' released code. Overrides go through `dataclasses.replace`; `asdict(config)` travels inside every
checkpoint we write so that a file can rebuild its own model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CoaTConfig:
    """Everything that decides the shape of a CoaT model.

    Attributes:
        embed_dims: channels of the four scales (strides 4, 8, 16, 32).
        serial_depths: serial blocks per scale.
        parallel_depth: parallel blocks over scales 2-4 (0 gives CoaT-Lite).
        num_heads: attention heads in every block.
        mlp_ratios: MLP hidden width / embed dim, per scale.
        patch_size: stride of the first patch embedding (later ones use 2).
        in_chans: input image channels.
        num_classes: classifier outputs (0 removes the classifier).
        qkv_bias: bias in the q/k/v projection.
        crpe_window: (window, heads) pairs of the convolutional relative position encoding; heads must sum to
            num_heads. The paper's ablation varies these.
        use_crpe: ablation switch: the CRPE term of conv-attention.
        use_cpe: ablation switch: the convolutional position encoding before every attention.
        cpe_kernel: kernel of the CPE depthwise conv.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth rate, the same in every block (the authors' choice, not a ramp).
        global_pool: 'token' (the class token, as the paper) or 'avg' (mean of image tokens).
    """

    embed_dims: tuple[int, int, int, int]
    serial_depths: tuple[int, int, int, int]
    parallel_depth: int = 0
    num_heads: int = 8
    mlp_ratios: tuple[float, float, float, float] = (4, 4, 4, 4)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    qkv_bias: bool = True
    crpe_window: tuple[tuple[int, int], ...] = ((3, 2), (5, 3), (7, 3))
    use_crpe: bool = True
    use_cpe: bool = True
    cpe_kernel: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    global_pool: str = "token"

    def __post_init__(self) -> None:
        # Normalise lists (from JSON / YAML) to tuples so configs compare and hash.
        for name in ("embed_dims", "serial_depths", "mlp_ratios"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        window = self.crpe_window
        if isinstance(window, dict):
            window = window.items()
        object.__setattr__(self, "crpe_window", tuple((int(k), int(h)) for k, h in window))
        if len(self.embed_dims) != 4 or len(self.serial_depths) != 4 or len(self.mlp_ratios) != 4:
            raise ValueError("embed_dims, serial_depths and mlp_ratios need 4 entries, one per scale")
        for dim in self.embed_dims:
            if dim % self.num_heads:
                raise ValueError(f"embed dim {dim} is not divisible by num_heads={self.num_heads}")
        if sum(h for _, h in self.crpe_window) != self.num_heads:
            raise ValueError(f"crpe_window heads {self.crpe_window} must add up to num_heads={self.num_heads}")
        if any(k % 2 == 0 for k, _ in self.crpe_window) or self.cpe_kernel % 2 == 0:
            raise ValueError("CRPE windows and the CPE kernel must be odd ('same' padding)")
        if self.parallel_depth > 0:
            if not self.embed_dims[1] == self.embed_dims[2] == self.embed_dims[3]:
                raise ValueError("parallel blocks need equal embed dims on scales 2-4")
            if not self.mlp_ratios[1] == self.mlp_ratios[2] == self.mlp_ratios[3]:
                raise ValueError("parallel blocks share one MLP: mlp ratios of scales 2-4 must be equal")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 removes the classifier), got {self.num_classes}")

    @property
    def min_input_size(self) -> int:
        """Smallest height/width that leaves at least one token at the last scale."""
        return self.patch_size * 8

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["crpe_window"] = [list(p) for p in self.crpe_window]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CoaTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown CoaTConfig keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class PretrainedEntry:
    """One set of released weights, as data: where it lives and how it was evaluated."""

    hub_id: str
    url: str
    sha256_prefix: str
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.9
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_classes: int = 1000
    paper_top1: float = 0.0
    paper_top5: float = 0.0
    paper_gmacs: float = 0.0
    labels: str = "imagenet-1k"


_LITE = dict(mlp_ratios=(8, 8, 4, 4))

# Variant table (paper Table 1; parameter counts in the tests match timm 1.0.31 exactly).
VARIANTS: dict[str, CoaTConfig] = {
    "coat_tiny": CoaTConfig(embed_dims=(152, 152, 152, 152), serial_depths=(2, 2, 2, 2), parallel_depth=6),
    "coat_mini": CoaTConfig(embed_dims=(152, 216, 216, 216), serial_depths=(2, 2, 2, 2), parallel_depth=6),
    "coat_small": CoaTConfig(embed_dims=(152, 320, 320, 320), serial_depths=(2, 2, 2, 2), parallel_depth=6),
    "coat_lite_tiny": CoaTConfig(embed_dims=(64, 128, 256, 320), serial_depths=(2, 2, 2, 2), **_LITE),
    "coat_lite_mini": CoaTConfig(embed_dims=(64, 128, 320, 512), serial_depths=(2, 2, 2, 2), **_LITE),
    "coat_lite_small": CoaTConfig(embed_dims=(64, 128, 320, 512), serial_depths=(3, 4, 6, 3), **_LITE),
    "coat_lite_medium": CoaTConfig(embed_dims=(128, 256, 320, 512), serial_depths=(3, 6, 10, 8)),
    "coat_lite_medium_384": CoaTConfig(embed_dims=(128, 256, 320, 512), serial_depths=(3, 6, 10, 8)),
    # Not from the paper: the smallest model with serial and parallel blocks, for fast tests.
    "coat_test": CoaTConfig(
        embed_dims=(16, 32, 32, 32), serial_depths=(1, 1, 1, 1), parallel_depth=1, mlp_ratios=(2, 2, 2, 2),
        num_classes=10,
    ),
}

# Default input size per variant (what the weights were trained at).
DEFAULT_INPUT_SIZE: dict[str, tuple[int, int]] = {name: (224, 224) for name in VARIANTS}
DEFAULT_INPUT_SIZE["coat_lite_medium_384"] = (384, 384)
DEFAULT_INPUT_SIZE["coat_test"] = (64, 64)

_AUTHORS = "https://vcl.ucsd.edu/coat/pretrained/"


def _entry(name: str, file: str, sha: str, top1: float, top5: float, gmacs: float, **kw: Any) -> PretrainedEntry:
    return PretrainedEntry(hub_id=f"timm/{name}.in1k", url=f"{_AUTHORS}{file}_{sha}.pth", sha256_prefix=sha,
                           paper_top1=top1, paper_top5=top5, paper_gmacs=gmacs, **kw)


# Released ImageNet-1k weights (authors' README accuracy; timm's evaluation metadata: crop 0.9, bicubic).
PRETRAINED: dict[str, PretrainedEntry] = {
    "coat_tiny": _entry("coat_tiny", "coat_tiny", "c6efc33c", 78.3, 94.0, 4.4),
    "coat_mini": _entry("coat_mini", "coat_mini", "40667eec", 81.0, 95.2, 6.8),
    "coat_small": _entry("coat_small", "coat_small", "7479cf9b", 82.1, 96.1, 12.6),
    "coat_lite_tiny": _entry("coat_lite_tiny", "coat_lite_tiny", "e88e96b0", 77.5, 93.8, 1.6),
    "coat_lite_mini": _entry("coat_lite_mini", "coat_lite_mini", "6b4a8ae5", 79.1, 94.5, 2.0),
    "coat_lite_small": _entry("coat_lite_small", "coat_lite_small", "8d362f48", 81.9, 95.5, 4.0),
    "coat_lite_medium": _entry("coat_lite_medium", "coat_lite_medium", "a750cd63", 83.6, 96.7, 9.8),
    "coat_lite_medium_384": _entry(
        "coat_lite_medium_384", "coat_lite_medium_384x384", "f9129688", 84.5, 97.1, 28.7,
        input_size=(3, 384, 384), crop_pct=1.0, crop_mode="squash"),
}
