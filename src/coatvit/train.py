"""Training: the authors' ImageNet recipe (coat-spec section 5) as one loop, from a laptop to many nodes.

Read top to bottom: the run configuration (`TrainConfig`, resolved from defaults < per-model recipe < config
file < flags), then the reusable pieces other loops share (`param_groups`, `lr_at`, `save_checkpoint` /
`load_checkpoint`, `prepare_run_dir`, `append_csv`, `progress`, `update_ema`), then `train` itself.

Distributed runs are launched by torchrun (`torchrun --nproc_per_node N -m coatvit train ...`): every process
reads RANK / WORLD_SIZE / LOCAL_RANK, gloo serves CPUs and NCCL GPUs, and only rank 0 writes files.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import errno
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
import types
import typing
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_write, atomic_write_text, remove_stale_temporaries
from .errors import CoaTError, ConfigError, DataError, WeightsError

# ------------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the defaults are the authors' ImageNet recipe (coat-spec section 5).

    Names follow timm's train.py flags (`--batch-size` is `batch_size`). `batch_size` is per process; the global
    batch is batch_size x processes x grad_accum, and with `lr` unset the learning rate is
    lr_base x global batch / lr_base_size.
    """

    # model
    model: str = "coat_lite_tiny"
    num_classes: int | None = None  # default: the dataset's class count
    img_size: tuple[int, int] | None = None  # default: the model's native size (224)
    drop_path: float = 0.1
    drop: float = 0.0
    finetune: str | None = None  # weights to start from (any format load_weights reads); the head is re-made
    pretrained: bool = False  # start from the released ImageNet weights
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the training forward/backward (evaluation and checkpoints: eager model)
    # data
    data: str | None = None  # ImageFolder root; None uses the built-in dataset
    val_split: float = 0.0
    builtin_train_size: int | None = None  # shrink the built-in dataset (tests, quick demos)
    builtin_val_size: int | None = None
    workers: int = 4
    # optimisation
    epochs: int = 300
    batch_size: int = 256
    grad_accum: int = 1
    lr: float | None = None
    lr_base: float = 5e-4
    lr_base_size: int = 512
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    opt_eps: float = 1e-8
    opt_betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None
    # augmentation
    no_aug: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4
    aa: str | None = "rand-m9-mstd0.5-inc1"
    train_interpolation: str = "bicubic"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    aug_repeats: int = 3
    # evaluation preprocessing stored with the weights
    crop_pct: float | None = None  # default: 0.9 for images of arbitrary size, 1.0 for the built-in dataset
    interpolation: str = "bicubic"
    # EMA, precision, devices
    model_ema: bool = True
    model_ema_decay: float = 0.99996
    amp: bool = False
    amp_dtype: str = "float16"
    device: str = "auto"
    threads: int | None = None  # torch CPU threads per process (default: torch's choice)
    seed: int = 0
    deterministic: bool = False
    # run directory and control
    output: str = "runs"
    experiment: str | None = None
    resume: str | None = None
    skip_nonfinite: bool = False
    log_interval: int = 50
    checkpoint_every: int = 1
    curves: bool = True  # redraw curves.png after every epoch (matplotlib takes ~1 s per plot)
    max_steps_per_epoch: int | None = None  # cut epochs short (tests, smoke runs)

    def __post_init__(self) -> None:
        for name, hint in _hints().items():
            value = getattr(self, name)
            object.__setattr__(self, name, _check_type(name, value, hint))
        if self.img_size is not None and len(self.img_size) == 1:
            object.__setattr__(self, "img_size", (self.img_size[0], self.img_size[0]))
        positive = ["epochs", "batch_size", "grad_accum", "lr_base_size", "log_interval", "checkpoint_every",
                    "aug_repeats", "recount"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("lr", "lr_base"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be positive, got {v}; a typical value is 5e-4")
        for name in ("min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "mixup", "cutmix", "color_jitter"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.model_ema_decay < 1:
            raise ConfigError(f"model_ema_decay must be in (0, 1), got {self.model_ema_decay}; the recipe's is 0.99996")
        if not 0 <= self.val_split < 1:
            raise ConfigError(f"val_split must be in [0, 1), got {self.val_split}")
        if self.clip_grad is not None and not self.clip_grad >= 0:
            raise ConfigError(f"clip_grad must be >= 0 (0 or left out: no clipping), got {self.clip_grad}")
        if self.clip_grad == 0:
            object.__setattr__(self, "clip_grad", None)  # clipping to norm 0 would zero every gradient
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch <= 0:
            raise ConfigError(f"max_steps_per_epoch must be a positive integer, got {self.max_steps_per_epoch}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1 and 0 < self.ratio[0] <= self.ratio[1]):
            raise ConfigError(f"scale must be 0 < min <= max <= 1 and ratio 0 < min <= max, got scale "
                              f"{list(self.scale)} and ratio {list(self.ratio)}")
        if not (self.opt_eps > 0 and all(0 <= b < 1 for b in self.opt_betas)):
            raise ConfigError(f"opt_eps must be positive and opt_betas in [0, 1), got {self.opt_eps} and "
                              f"{list(self.opt_betas)}")
        if self.img_size is not None and (len(self.img_size) != 2 or min(self.img_size) <= 0):
            raise ConfigError(f"img_size takes one or two positive integers, got {self.img_size}")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"threads must be positive, got {self.threads}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise ConfigError(f"amp_dtype must be 'float16' or 'bfloat16', got {self.amp_dtype!r}")
        for name in ("reprob", "mixup_prob", "mixup_switch_prob", "hflip", "smoothing", "drop_path", "drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.num_classes is not None and self.num_classes <= 0:
            raise ConfigError(f"num_classes must be positive, got {self.num_classes}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ConfigError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.finetune and self.pretrained:
            raise ConfigError("pass either --finetune WEIGHTS or --pretrained, not both")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Builds a config from a mapping (a YAML/JSON file, flags); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            import difflib

            hints = [f"{k} (did you mean {difflib.get_close_matches(k, known, 1)[0]}?)"
                     if difflib.get_close_matches(k, known, 1) else k for k in unknown]
            raise ConfigError(f"unknown training settings: {', '.join(hints)}")
        return cls(**data)


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Checks `value` against a field's annotation; converts lists to tuples and ints to floats where expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(name, value, inner[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            if isinstance(value, int) and not isinstance(value, bool) and name == "img_size":
                return (value, value)
            raise ConfigError(f"{name} must be a list of {len(args)} numbers, got {value!r}")
        if name != "img_size" and len(value) != len(args):
            raise ConfigError(f"{name} must have {len(args)} entries, got {list(value)}")
        return tuple(_check_type(name, v, args[0]) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


# Per-model departures from the recipe (coat-spec section 5). Batch sizes are per process for 8 processes.
MODEL_RECIPES: dict[str, dict[str, Any]] = {
    "coat_small": dict(batch_size=128, drop_path=0.2, model_ema=False, warmup_epochs=20, clip_grad=5.0),
    "coat_lite_medium": dict(batch_size=128, drop_path=0.3, model_ema=False, warmup_epochs=20, clip_grad=5.0),
    # 384 px: fine-tune from the 224 weights (pass --finetune or --pretrained with coat_lite_medium's file).
    "coat_lite_medium_384": dict(epochs=6, lr_base=5e-6, weight_decay=1e-8, warmup_epochs=0, drop_path=0.2,
                                 batch_size=32, model_ema=False, clip_grad=5.0),
}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a YAML or JSON mapping of settings (keys as in `TrainConfig`, dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise ConfigError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve_config(flags: Mapping[str, Any], config_file: str | None = None) -> TrainConfig:
    """The run's config: defaults < the model's recipe < resumed run's config < config file < flags.

    Args:
        flags: settings given explicitly on the command line (only those; unset flags must be absent).
        config_file: a YAML/JSON file of settings.
    """
    file_values = read_config_file(config_file) if config_file else {}
    explicit = {**file_values, **{k.replace("-", "_"): v for k, v in flags.items()}}
    TrainConfig.from_dict(explicit)  # reject unknown keys and bad types early, before any file is read
    base: dict[str, Any] = {}
    if explicit.get("resume"):
        saved = load_checkpoint(explicit["resume"]).get("train_config")
        if not isinstance(saved, dict):
            raise WeightsError(f"{explicit['resume']} is not a training checkpoint of coatvit (no train_config)")
        base = dict(saved)
        base.pop("resume", None)
        if explicit.get("model", base["model"]) != base["model"]:
            raise WeightsError(f"cannot resume: {explicit['resume']} is a {base['model']} run, not "
                               f"{explicit['model']}; drop --model or pick the right checkpoint")
    model = explicit.get("model", base.get("model", TrainConfig.model))
    merged = {**MODEL_RECIPES.get(model, {}), **base, **explicit}
    return TrainConfig.from_dict(merged)


# ------------------------------------------------------------------------------------------------------------
# reusable pieces: optimizer groups, lr schedule, EMA, checkpoints, run directory, progress


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay on weights, none on biases, norms (1-D tensors) and `no_weight_decay()`."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0, warmup_lr: float = 0.0,
          min_lr: float = 0.0) -> float:
    """Learning rate after `step` optimizer updates: linear warmup from warmup_lr, then cosine down to min_lr."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for float parameters and buffers (others are copied)."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(m.detach(), 1 - decay)
        else:
            e.copy_(m)


def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from, in a form `torch.load(weights_only=True)` reads back."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Writes a checkpoint dict atomically (temp file, fsync, rename): a crash leaves the old file or the new one.

    `state` holds tensors, plain containers, strings and numbers only, so `load_checkpoint` needs no unpickling
    of code.
    """
    return atomic_write(path, lambda tmp: torch.save(dict(state), tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint written by `save_checkpoint` with `torch.load(weights_only=True)` (no code runs).

    Raises:
        WeightsError: the file is missing, empty, truncated, or holds pickled objects other than plain data.
    """
    from .weights import read_torch_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise WeightsError(f"checkpoint {path} is empty (0 bytes); use the previous checkpoint or start again")
    obj = read_torch_file(path)  # weights_only=True; clear errors for truncated, corrupt or code-carrying files
    if not isinstance(obj, dict):
        raise WeightsError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def git_sha() -> str:
    """The commit of the coatvit source tree (with '-dirty' when it has changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("coatvit", "torch", "torchvision", "timm", "numpy", "pillow", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def check_writable(folder: str | os.PathLike, *, create: bool = True) -> Path:
    """Proves a file can be written in `folder` (before any training time is spent) and returns it.

    With `create` the folder is made if needed and probed; without, nothing is left behind: the nearest existing
    ancestor is probed instead (so a run that fails its later checks leaves no empty run directory).

    Raises:
        PermissionError naming the folder when it cannot be written.
    """
    folder = Path(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            probe_dir = folder
        else:
            probe_dir = folder.absolute()
            while not probe_dir.exists() and probe_dir != probe_dir.parent:
                probe_dir = probe_dir.parent
            if not probe_dir.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "a file is in the way", str(probe_dir))
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"output folder {folder} is not writable ({e.strerror or e}); "
                              f"pass --output pointing at a writable folder") from None
    return folder


def prepare_run_dir(run_dir: str | os.PathLike, *, config: Mapping[str, Any], argv: Sequence[str] | None = None
                    ) -> Path:
    """Creates the run directory and records how the run was made: config.yaml (resolved), command.txt,
    env.json (git SHA and library versions). Returns the directory."""
    import yaml

    run_dir = check_writable(run_dir)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(dict(config), sort_keys=False))
    argv = list(sys.argv if argv is None else argv)
    atomic_write_text(run_dir / "command.txt", shlex.join(argv) + "\n")
    env = {"git_sha": git_sha(), "versions": library_versions(),
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(run_dir / "env.json", json.dumps(env, indent=2) + "\n")
    return run_dir


def append_csv(path: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Appends one row to a CSV file, writing the header first when the file is new (the whole file is rewritten
    atomically, so a crash never leaves half a row)."""
    path = Path(path)
    rows = read_csv(path)
    rows.append({k: row[k] for k in row})
    fields = list(rows[0].keys())
    for r in rows[1:]:
        fields += [k for k in r if k not in fields]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def truncate_csv(path: str | os.PathLike, keep: typing.Callable[[dict[str, str]], bool]) -> None:
    """Keeps the rows for which `keep(row)` is true (used on resume to drop epochs the checkpoint does not hold)."""
    path = Path(path)
    rows = read_csv(path)
    if not rows:
        return
    kept = [r for r in rows if keep(r)]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(kept)

    atomic_write(path, write)


class progress:
    """Iterates `iterable`: a tqdm bar (throughput, ETA) on a terminal, a plain line every `every` steps
    otherwise, nothing when `enabled` is false (ranks other than 0). `set(**metrics)` shows running metrics."""

    def __init__(self, iterable: Iterable, *, total: int | None = None, desc: str = "", every: int = 50,
                 enabled: bool = True, unit: str = "it", stream=None):
        self.iterable, self.total, self.desc, self.every = iterable, total, desc, max(1, every)
        self.enabled, self.unit = enabled, unit
        self.stream = stream or sys.stderr
        self.metrics: dict[str, Any] = {}
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=False)

    def set(self, **metrics: Any) -> None:
        self.metrics.update(metrics)
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(v) for k, v in self.metrics.items()}, refresh=False)

    def __iter__(self):
        start = time.perf_counter()
        for i, item in enumerate(self.iterable, 1):
            yield item
            if self.bar is not None:
                self.bar.update(1)
            elif self.enabled and (i % self.every == 0 or i == self.total):
                elapsed = time.perf_counter() - start
                rate = i / elapsed if elapsed > 0 else 0.0
                eta = (self.total - i) / rate if self.total and rate > 0 else 0.0
                extra = " ".join(f"{k} {_fmt(v)}" for k, v in self.metrics.items())
                total = f"/{self.total}" if self.total else ""
                print(f"{self.desc} {i}{total} {rate:.2f} {self.unit}/s eta {eta:.0f}s {extra}".rstrip(),
                      file=self.stream, flush=True)
        if self.bar is not None:
            self.bar.close()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def log(message: str, enabled: bool = True) -> None:
    if enabled:
        print(message, flush=True)


# ------------------------------------------------------------------------------------------------------------
# distributed setup


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def parse_device(name: str, local_rank: int = 0) -> torch.device:
    """The device `--device name` asks for, checked against the visible ones: 'auto' picks cuda (this process's
    local rank) when available, else cpu; 'cuda' means the local rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N (or mps), got {name!r}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name} was asked for but this machine has no MPS device; use --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ConfigError(f"--device {device} was asked for but only {count} CUDA GPU(s) are visible "
                              f"(cuda:0 to cuda:{count - 1})")
    return device


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`parse_device`, made the current CUDA device where it is one."""
    device = parse_device(name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Joins the process group torchrun describes in the environment (or runs alone when it describes none)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), resolve_device(device_name)
    ddp = Distributed(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name, ddp.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get("COATVIT_DIST_TIMEOUT", "600")))
        dist.init_process_group(backend, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return ddp, device


def all_reduce_sum(values: Sequence[float], ddp: Distributed, device: torch.device) -> list[float]:
    """Sums numbers over ranks (float64)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if ddp.enabled:
        dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------------------------
# losses and evaluation


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a probability distribution per sample (mixup/cutmix targets)."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Iterable, *, device: torch.device, ddp: Distributed,
                   amp_ctx=nullcontext) -> dict[str, float]:
    """Top-1, top-5 and mean cross-entropy of `model` over a loader of (x, y, skipped), summed over ranks."""
    model.eval()
    loss_sum = correct1 = correct5 = count = skipped = 0.0
    for x, y, bad in loader:
        skipped += bad
        if len(y) == 0:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp_ctx():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        count += len(y)
    loss_sum, correct1, correct5, count, skipped = all_reduce_sum(
        [loss_sum, correct1, correct5, count, skipped], ddp, device)
    n = max(count, 1.0)
    return {"loss": loss_sum / n, "top1": 100 * correct1 / n, "top5": 100 * correct5 / n, "images": int(count),
            "skipped": int(skipped)}


class NonFiniteLossError(CoaTError):
    """The loss became NaN or infinite."""


def _oom_error(e: BaseException, cfg: TrainConfig) -> CoaTError:
    return CoaTError(f"out of memory at batch size {cfg.batch_size} per process ({str(e).splitlines()[0][:120]}); "
                     f"lower -b/--batch-size (and raise --grad-accum to keep the global batch), or use --amp")


def plot_curves(rows: list[Mapping[str, Any]], path: Path) -> None:
    """Writes loss, top-1 and learning rate against epoch to a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(name):
        return [float(r[name]) for r in rows]

    epochs = col("epoch")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, col("train_loss"), "o-", label="train")
    axes[0].plot(epochs, col("eval_loss"), "o-", label="eval")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(epochs, col("eval_top1"), "o-", label="top-1")
    if rows and rows[0].get("ema_top1") not in (None, ""):
        axes[1].plot(epochs, col("ema_top1"), "o-", label="EMA top-1")
    axes[1].set_title("eval accuracy (%)")
    axes[1].legend()
    axes[2].plot(epochs, col("lr"), "o-")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------
# the training loop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, *, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains (or fine-tunes, or resumes) a CoaT classifier as `cfg` says.

    Returns the last epoch's summary row plus best_top1, run_dir, and the trained `model` and `ema` modules.

    Writes the run directory (rank 0 only): config.yaml, command.txt, env.json, summary.csv, curves.png,
    last.pth and best.pth. Raises `CoaTError` subclasses for problems a user can fix.
    """
    from .data import DataConfig, RepeatSampler, ShardSampler, build_datasets, collate_skipping, eval_transform
    from .data import train_transform
    from .registry import create_model, get_config
    from .config import DEFAULT_INPUT_SIZE
    from .weights import load_weights

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    ddp, device = init_distributed(cfg.device)
    main = ddp.is_main
    arch = get_config(cfg.model)  # unknown names fail here, with suggestions
    resume_state = load_checkpoint(cfg.resume) if cfg.resume else None
    run_dir = Path(cfg.resume).parent if cfg.resume and cfg.experiment is None else Path(cfg.output) / (
        cfg.experiment or f"{cfg.model}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    if main:
        check_writable(run_dir, create=False)  # before any data is read or time spent; creates nothing
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(cfg.seed)

    # ---- data
    img_size = tuple(cfg.img_size) if cfg.img_size else DEFAULT_INPUT_SIZE.get(cfg.model, (224, 224))
    if min(img_size) < arch.min_input_size:
        raise ConfigError(f"--img-size {img_size[0]} {img_size[1]} is too small: {cfg.model} needs at least "
                          f"{arch.min_input_size} px per side")
    crop_pct = cfg.crop_pct if cfg.crop_pct is not None else (1.0 if cfg.data is None else 0.9)
    data_config = DataConfig(input_size=img_size, crop_pct=crop_pct, interpolation=cfg.interpolation)
    train_tf = train_transform(input_size=img_size, no_aug=cfg.no_aug, scale=cfg.scale, ratio=cfg.ratio,
                               hflip=cfg.hflip, color_jitter=cfg.color_jitter, aa=cfg.aa,
                               interpolation=cfg.train_interpolation, reprob=cfg.reprob, remode=cfg.remode,
                               recount=cfg.recount)
    train_set, val_set, class_names = build_datasets(
        cfg.data, val_split=cfg.val_split, seed=cfg.seed, train_tf=train_tf, eval_tf=eval_transform(data_config),
        builtin_size=(cfg.builtin_train_size, cfg.builtin_val_size))
    num_classes = cfg.num_classes or len(class_names)
    if num_classes < len(class_names):
        raise ConfigError(f"--num-classes {num_classes} is smaller than the {len(class_names)} classes in the data")
    sampler = RepeatSampler(len(train_set), repeats=cfg.aug_repeats, rank=ddp.rank, world_size=ddp.world_size,
                            seed=cfg.seed)
    loader_args = dict(num_workers=cfg.workers, collate_fn=collate_skipping, pin_memory=device.type == "cuda",
                       persistent_workers=False)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                               **loader_args)
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=cfg.batch_size, sampler=ShardSampler(len(val_set), rank=ddp.rank,
                                                                 world_size=ddp.world_size), **loader_args)
    if len(train_loader) == 0:
        raise DataError(f"the training set has {len(train_set)} images, fewer than one batch of {cfg.batch_size} "
                        f"per process; lower --batch-size")
    mixup_fn = None
    if not cfg.no_aug and (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0:
        from timm.data import Mixup

        if cfg.batch_size % 2:
            raise ConfigError(f"mixup/cutmix need an even batch size, got {cfg.batch_size}")
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                         switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing, num_classes=num_classes)

    # ---- model, EMA, optimizer
    weights = None
    if cfg.finetune:
        weights = cfg.finetune
    model = create_model(cfg.model, pretrained=cfg.pretrained, weights=weights, num_classes=num_classes,
                         drop_path_rate=cfg.drop_path, drop_rate=cfg.drop)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.model_ema else None
    global_batch = cfg.batch_size * ddp.world_size * cfg.grad_accum
    lr = cfg.lr if cfg.lr is not None else cfg.lr_base * global_batch / cfg.lr_base_size
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=cfg.opt_betas,
                                  eps=cfg.opt_eps)
    amp_dtype = torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16
    use_amp = cfg.amp and (device.type == "cuda" or amp_dtype == torch.bfloat16)
    if cfg.amp and not use_amp:
        raise ConfigError("--amp with float16 needs a GPU; on CPU pass --amp-dtype bfloat16")
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)

    def amp_ctx():
        return torch.autocast(device.type, dtype=amp_dtype) if use_amp else nullcontext()

    updates_per_epoch = len(train_loader) // cfg.grad_accum
    if cfg.max_steps_per_epoch:
        updates_per_epoch = min(updates_per_epoch, cfg.max_steps_per_epoch)
    if updates_per_epoch == 0:
        raise ConfigError(f"--grad-accum {cfg.grad_accum} is larger than the {len(train_loader)} batches per epoch")
    total_steps = cfg.epochs * updates_per_epoch
    warmup_steps = round(cfg.warmup_epochs * updates_per_epoch)

    start_epoch, step, best_top1, nonfinite_total, wall_before = 0, 0, -1.0, 0, 0.0
    if resume_state is not None:
        if resume_state.get("model_name") != cfg.model:
            raise WeightsError(f"cannot resume: {cfg.resume} holds a {resume_state.get('model_name')} model, "
                               f"not {cfg.model}")
        load_weights(model, resume_state["model"])
        if ema is not None and resume_state.get("ema") is not None:
            load_weights(ema, resume_state["ema"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch = int(resume_state["epoch"]) + 1
        step = int(resume_state["scheduler"]["step"])
        best_top1 = float(resume_state.get("best_top1", -1.0))
        nonfinite_total = int(resume_state.get("nonfinite_steps", 0))
        wall_before = float(resume_state.get("wall_time_s", 0.0))
        set_rng_state(resume_state["rng"])
        log(f"resumed {cfg.resume}: epoch {start_epoch} of {cfg.epochs}, step {step}", main)

    train_model: nn.Module = model
    if ddp.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        # The wrapper shares the model's parameters: EMA, evaluation and checkpoints keep using `model` itself
        # (its state-dict keys, no `_orig_mod.` prefix). The first steps compile (about a minute).
        train_model = torch.compile(train_model)

    config_dict = cfg.to_dict()
    if main:
        prepare_run_dir(run_dir, config={**config_dict, "resolved": {
            "lr": lr, "global_batch": global_batch, "world_size": ddp.world_size, "img_size": list(img_size),
            "num_classes": num_classes, "device": str(device), "updates_per_epoch": updates_per_epoch}}, argv=argv)
        if resume_state is not None:
            truncate_csv(run_dir / "summary.csv", lambda r: int(r["epoch"]) < start_epoch)
            for tmp in remove_stale_temporaries(run_dir):
                log(f"removed {tmp.name}, a partial write of the interrupted run", main)
        log(f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters, {num_classes} classes, "
            f"{len(train_set)} train / {len(val_set)} val images at {img_size[0]}x{img_size[1]}, global batch "
            f"{global_batch}, lr {lr:.3g}, {cfg.epochs} epochs x {updates_per_epoch} steps on {device} "
            f"({ddp.world_size} process{'es' if ddp.enabled else ''}); run dir {run_dir}")

    def checkpoint_state(epoch: int) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "ema": None if ema is None else {k: v.detach().cpu() for k, v in ema.state_dict().items()},
            "optimizer": optimizer.state_dict(), "scheduler": {"step": step, "total_steps": total_steps},
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "epoch": epoch, "step": step,
            "best_top1": best_top1, "nonfinite_steps": nonfinite_total, "rng": rng_state(),
            "wall_time_s": wall_before + time.perf_counter() - run_start,
            "model_name": cfg.model, "config": model.config.to_dict(), "class_names": list(class_names),
            "data_config": data_config.to_dict(), "train_config": config_dict,
        }

    summary: dict[str, Any] = {}
    run_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        # Reseeding per epoch makes an epoch's randomness independent of how the run got there (resume == no stop).
        seed_everything(cfg.seed * 1000 + epoch)
        sampler.set_epoch(epoch)
        train_model.train()
        epoch_start = time.perf_counter()
        loss_sum = seen = skipped = 0.0
        nonfinite_epoch = 0
        batches = iter(train_loader)
        bar = progress(range(updates_per_epoch), total=updates_per_epoch, desc=f"epoch {epoch}",
                       every=cfg.log_interval, enabled=main, unit="step")
        for _ in bar:
            optimizer.zero_grad(set_to_none=True)
            lr_now = lr_at(step, base_lr=lr, total_steps=total_steps, warmup_steps=warmup_steps,
                           warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            step_loss = 0.0
            bad = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y, nskip = next(batches)
                skipped += nskip
                if mixup_fn is not None and len(y) % 2:
                    x, y = x[:-1], y[:-1]  # a skipped image left an odd batch; mixup pairs samples
                if len(y) == 0:  # every image of the batch was unreadable (or the one left was dropped above)
                    continue
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if mixup_fn is not None:
                    x, target = mixup_fn(x, y)
                sync = micro == cfg.grad_accum - 1 or not ddp.enabled
                with (nullcontext() if sync else train_model.no_sync()):
                    try:
                        with amp_ctx():
                            logits = train_model(x)
                            if mixup_fn is not None:
                                loss = soft_target_cross_entropy(logits.float(), target)
                            else:
                                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.smoothing)
                        if not torch.isfinite(loss):
                            bad += 1
                        scaler.scale(loss / cfg.grad_accum).backward()
                    except torch.OutOfMemoryError as e:
                        raise _oom_error(e, cfg) from None
                step_loss += loss.item() * len(y)
                seen += len(y)
            if not scaler.is_enabled() and bad.item() == 0:
                # A finite loss can still give a NaN/Inf gradient; one optimizer step with it would turn the weights
                # into NaN and the next checkpoint would overwrite the last good one. (float16 AMP: the scaler
                # already skips such steps.)
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                if grads and not torch.isfinite(nn.utils.get_total_norm(grads, norm_type=math.inf)):
                    bad += 1
            if ddp.enabled:
                dist.all_reduce(bad)  # every rank takes the same decision
            if bad.item() > 0:
                nonfinite_epoch += 1
                nonfinite_total += 1
                if not cfg.skip_nonfinite:
                    last = run_dir / "last.pth"
                    kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
                    cause = ("AMP float16 overflow is likely: try --amp-dtype bfloat16 or no --amp"
                             if use_amp and amp_dtype == torch.float16 else
                             f"the learning rate {lr_now:.3g} is likely too high: lower --lr or set --clip-grad")
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at epoch {epoch}, step {step} (update {step + 1}); {cause}; "
                        f"{kept}; --skip-nonfinite skips such steps instead")
                optimizer.zero_grad(set_to_none=True)
                if scaler.is_enabled():
                    scaler.update()
                continue
            loss_sum += step_loss
            if cfg.clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            if ema is not None:
                update_ema(ema, model, cfg.model_ema_decay)
            bar.set(loss=loss_sum / max(seen, 1), lr=lr_now)
        train_time = time.perf_counter() - epoch_start
        loss_sum, seen, skipped, nonfinite_epoch = all_reduce_sum(
            [loss_sum, seen, skipped, nonfinite_epoch], ddp, device)

        metrics = evaluate_model(model, val_loader, device=device, ddp=ddp, amp_ctx=amp_ctx)
        ema_metrics = evaluate_model(ema, val_loader, device=device, ddp=ddp, amp_ctx=amp_ctx) if ema else None
        is_best = metrics["top1"] > best_top1
        best_top1 = max(best_top1, metrics["top1"])
        summary = {
            "epoch": epoch, "lr": lr_now, "train_loss": loss_sum / max(seen, 1), "eval_loss": metrics["loss"],
            "eval_top1": metrics["top1"], "eval_top5": metrics["top5"],
            "images_per_s": seen / train_time if train_time > 0 else 0.0,
            "wall_time_s": wall_before + time.perf_counter() - run_start,
            "ema_top1": ema_metrics["top1"] if ema_metrics else "",
            "skipped_images": int(skipped + metrics["skipped"]), "nonfinite_steps": int(nonfinite_epoch),
        }
        if main:
            log(f"epoch {epoch}: train_loss {summary['train_loss']:.4f} eval_loss {metrics['loss']:.4f} "
                f"top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f}"
                + (f" ema_top1 {ema_metrics['top1']:.2f}" if ema_metrics else "")
                + f" {summary['images_per_s']:.1f} img/s lr {lr_now:.3g}"
                + (f" skipped {summary['skipped_images']} images" if summary["skipped_images"] else ""))
            append_csv(run_dir / "summary.csv", {k: _csv_value(v) for k, v in summary.items()})
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch == cfg.epochs - 1 or is_best:
                state = checkpoint_state(epoch)
                save_checkpoint(run_dir / "last.pth", state)
                if is_best:
                    save_checkpoint(run_dir / "best.pth", state)
            if cfg.curves:
                plot_curves(read_csv(run_dir / "summary.csv"), run_dir / "curves.png")
    if main and summary:
        total_skipped = sum(int(r.get("skipped_images") or 0) for r in read_csv(run_dir / "summary.csv"))
        log(f"done: best top1 {best_top1:.2f}; last top1 {summary['eval_top1']:.2f}; "
            f"{total_skipped} unreadable images skipped; {nonfinite_total} non-finite steps skipped; "
            f"checkpoints in {run_dir}")
    if ddp.enabled:
        dist.barrier()
    return {**summary, "best_top1": best_top1, "run_dir": str(run_dir), "model": model, "ema": ema}


def _csv_value(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v
