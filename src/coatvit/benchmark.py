"""Speed of our models against timm's, measured the way the numbers are reported: A and B interleaved in one
process, median of several repeats with their spread, and ratios rather than absolute times.

Three measures per implementation: inference throughput at a batch size, latency at batch 1, and a training step
(forward, cross-entropy backward, AdamW). Next to them: GMACs (the paper's count, from `coatvit.flops`), achieved
MAC/s as a fraction of a matmul peak measured in the same run, peak memory, the machine's load average and versions.

The baselines are timm's model of the same name (`timm`, `timm-compile`) and our own reference path (`reference`).
timm is imported only here and only when asked for: it is the yardstick, never part of our models.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

try:
    import resource  # page-fault counts (Unix)
except ImportError:  # Windows
    resource = None

from .runtime import allocator_tuned, tune_cpu_allocator

BASELINES = ("timm", "timm-compile", "reference", "ours-compile", "ours-ckpt", "ours-triton", "ours-no-triton",
             "ours-no-native", "ours-no-onednn")
MODES = ("infer", "latency", "train")
AMP_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's

# timm's benchmark.py column names, so the CSVs line up with theirs; the rest are ours.
CSV_COLUMNS = (
    "model", "impl", "infer_samples_per_sec", "infer_step_time", "infer_batch_size", "infer_img_size",
    "infer_gmacs", "param_count", "infer_speedup", "infer_spread", "latency_step_time", "latency_speedup",
    "latency_spread", "train_samples_per_sec", "train_step_time", "train_batch_size", "train_img_size",
    "train_speedup", "train_spread", "infer_peak_mem_mb", "train_peak_mem_mb", "mac_fraction_of_matmul_peak",
    "matmul_peak_gflops", "device", "threads", "amp", "channels_last", "compile", "compile_mode", "freeze", "repeats",
    "load_before", "load_after", "torch", "timm", "cpu", "allocator", "infer_page_faults", "latency_page_faults",
    "train_page_faults",
)


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to measure.

    Attributes:
        model: a registered model name (timm has the same names).
        batch_size: batch of the inference and training measures.
        img_size: (H, W) input size.
        device: 'cpu', 'cuda', 'cuda:1', ...
        amp: autocast dtype ('none', 'bfloat16', 'float16'); weights stay fp32.
        channels_last: channels-last model and input (both implementations).
        compile: torch.compile our model (baselines keep their own setting: `timm-compile` compiles timm's).
        compile_mode: torch.compile's `mode` for every compiled contender alike ('default', 'reduce-overhead',
            'max-autotune', 'max-autotune-no-cudagraphs'); 'max-autotune' on a CPU with `freeze` lets inductor
            pick its own C++ GEMM kernels, epilogues fused.
        freeze: compile inference with inductor's freezing (every compiled contender alike): the weights become
            constants of the graph, folded and, on a CPU, pre-packed for oneDNN. For deployment, where the weights
            no longer change; graphs that need gradients (training) ignore it.
        vs: baselines measured against ours, each interleaved with it: 'timm', 'timm-compile', 'reference'
            (our reference path), 'ours-compile', 'ours-ckpt' (ours with gradient checkpointing: the training
            speed and peak memory it trades), 'ours-triton' (ours with the Triton kernels of `coatvit.kernels`
            forced on, any batch size: CUDA), 'ours-no-triton' (ours with them off; 'ours' itself follows their
            default, `COATVIT_TRITON`: on for CUDA batches of 128 images or more), 'ours-no-native' (ours without
            the native CPU kernels of `coatvit.native`, which 'ours' runs where `COATVIT_NATIVE` allows),
            'ours-no-onednn' (ours with its linear layers through PyTorch's own kernels instead of oneDNN's,
            `coatvit.onednn`, which 'ours' takes where `COATVIT_ONEDNN` allows).
        modes: which of 'infer', 'latency', 'train' to run.
        repeats: interleaved repeats; the median and the spread (min-max) are reported.
        steps: timed steps per repeat (their mean is one sample).
        warmup: untimed steps before the first repeat (torch.compile compiles here).
        threads: torch CPU threads (None leaves torch's default).
        peak_memory: also measure peak memory (on CPU: peak RSS of a child process running one step).
        matmul_size: n of the n x n x n matmul whose FLOP/s is the peak reported beside the model's rate (None:
            2048 on a CPU, 8192 on a GPU, where smaller products cannot fill the chip). It runs in the autocast
            dtype (fp32 without `amp`): a bf16 model is compared with the bf16 peak.
        seed: seed of the weights and inputs.
        tuned_allocator: call `coatvit.runtime.tune_cpu_allocator()` first (process-wide: every contender gets
            it, as in the `coatvit` commands); False measures the allocator as a plain Python process has it.
    """

    model: str = "coat_lite_tiny"
    batch_size: int = 16
    img_size: tuple[int, int] = (224, 224)
    device: str = "cpu"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    freeze: bool = False
    vs: tuple[str, ...] = ("timm",)
    modes: tuple[str, ...] = MODES
    repeats: int = 5
    steps: int = 2
    warmup: int = 1
    threads: int | None = None
    peak_memory: bool = True
    matmul_size: int | None = None
    seed: int = 0
    tuned_allocator: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", tuple(self.img_size))
        object.__setattr__(self, "vs", tuple(self.vs))
        object.__setattr__(self, "modes", tuple(self.modes))
        bad = [v for v in self.vs if v not in BASELINES]
        if bad:
            raise ValueError(f"unknown baseline(s) {bad}; expected any of {list(BASELINES)}")
        if "ours-triton" in self.vs:
            from . import kernels

            if not kernels.available():
                raise ValueError("--vs ours-triton needs triton installed (it comes with CUDA builds of torch)")
            if not (self.device.startswith("cuda") or kernels.interpreting()):
                raise ValueError(f"--vs ours-triton runs Triton kernels on a GPU; got --device {self.device}, "
                                 "use --device cuda")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {list(MODES)}, got {list(self.modes)}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {list(AMP_DTYPES)}, got {self.amp!r}")
        if self.batch_size < 1 or self.repeats < 1 or self.steps < 1 or self.warmup < 0:
            raise ValueError("batch_size, repeats and steps must be >= 1 and warmup >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads} (leave it out for torch's default)")
        if len(self.img_size) != 2 or min(self.img_size) < 1:
            raise ValueError(f"img_size must be (H, W) with positive sides, got {self.img_size}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {list(COMPILE_MODES)}, got {self.compile_mode!r}")
        compiled = self.compile or any(v.endswith("-compile") for v in self.vs)
        for flag, on in (("--freeze", self.freeze), ("--compile-mode", self.compile_mode != "default")):
            if on and not compiled:
                raise ValueError(f"{flag} applies to compiled models, and none is measured: add --compile or a "
                                 "-compile baseline (e.g. --vs timm ours-compile)")


# ----------------------------------------------------------------------------------------------------------------
# building the contenders


def build_model(impl: str, cfg: BenchmarkConfig) -> nn.Module:
    """One contender: 'ours' (fast path), 'ours-ckpt' (fast path, gradient checkpointing), 'reference' (our
    reference path), 'timm', or a '-compile' variant."""
    base = impl.removesuffix("-compile")
    torch.manual_seed(cfg.seed)
    if base in ("ours", "ours-ckpt", "ours-triton", "ours-no-triton", "ours-no-native", "ours-no-onednn",
                "reference"):
        from .registry import create_model

        model = create_model(cfg.model)
        model.set_fast_path(base != "reference")
        model.set_grad_checkpointing(base == "ours-ckpt")
    elif base == "timm":
        from .registry import get_config

        model = _timm_model(cfg.model, get_config(cfg.model), cfg.img_size)
    else:
        raise ValueError(f"unknown implementation {impl!r}; expected ours, reference or timm")
    model = model.to(cfg.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if impl.endswith("-compile") or (impl == "ours" and cfg.compile):
        model = compile_model(model, cfg)
    return model


def compile_model(model: nn.Module, cfg: BenchmarkConfig) -> nn.Module:
    """torch.compile for fixed shapes in `cfg.compile_mode`; with `cfg.freeze`, inductor's freezing for graphs
    without gradients."""
    compiled = torch.compile(model, dynamic=False, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    return Frozen(compiled) if cfg.freeze else compiled


class Frozen(nn.Module):
    """Calls a compiled module with inductor's freezing on, so that the graphs compiled on those calls have it.
    (Passed as `torch.compile(options=...)`, torch 2.14 compiles without it; the global setting would also reach
    compiled contenders that did not ask for it.)"""

    def __init__(self, compiled: nn.Module):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args, **kwargs):
        from torch._inductor import config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def _timm_model(name: str, config, img_size: tuple[int, int]) -> nn.Module:
    """timm's model of the same name; for our own variants (coat_test) timm's CoaT class with the same config."""
    try:
        import timm
        from timm.models.coat import CoaT as TimmCoaT
    except ImportError:
        raise ValueError("--vs timm needs timm installed: pip install 'coatvit[dev]'") from None
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, img_size=img_size)
    return TimmCoaT(
        img_size=img_size, patch_size=config.patch_size, in_chans=config.in_chans, num_classes=config.num_classes,
        embed_dims=config.embed_dims, serial_depths=config.serial_depths, parallel_depth=config.parallel_depth,
        num_heads=config.num_heads, mlp_ratios=config.mlp_ratios, qkv_bias=config.qkv_bias,
        crpe_window=dict(config.crpe_window), global_pool=config.global_pool)


# ----------------------------------------------------------------------------------------------------------------
# one step of each measure


def contender_step(impl: str, mode: str, model: nn.Module, cfg: BenchmarkConfig) -> Callable[[], None]:
    """`make_step` for one contender; 'ours-triton' runs its steps with `coatvit.kernels` forced on,
    'ours-no-triton' with them off, 'ours-no-native' with `coatvit.native` off, 'ours-no-onednn' with
    `coatvit.onednn` off."""
    step = make_step(mode, model, cfg)
    if impl not in ("ours-triton", "ours-no-triton", "ours-no-native", "ours-no-onednn"):
        return step
    from . import kernels, native, onednn

    switch, on = {"ours-no-native": (native, False), "ours-no-onednn": (onednn, False)}.get(
        impl, (kernels, impl == "ours-triton"))

    def with_kernels():
        switch.set_enabled(on)
        try:
            step()
        finally:
            switch.set_enabled(None)

    return with_kernels


def make_step(mode: str, model: nn.Module, cfg: BenchmarkConfig) -> Callable[[], None]:
    """A closure that runs one step of `mode` on fixed random inputs (made once, outside the timing)."""
    device = torch.device(cfg.device)
    batch = 1 if mode == "latency" else cfg.batch_size
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(batch, 3, *cfg.img_size, generator=gen).to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp_dtype = AMP_DTYPES[cfg.amp]

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    if mode in ("infer", "latency"):
        model.eval()

        def infer():
            with torch.no_grad(), autocast():
                model(x)

        return infer

    model.train()
    num_classes = _num_classes(model)
    target = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    loss_fn = nn.CrossEntropyLoss()

    def train():
        with autocast():
            loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


def _num_classes(model: nn.Module) -> int:
    inner = getattr(model, "_orig_mod", model)
    return int(getattr(inner, "num_classes", 1000))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(steps: dict[str, Callable[[], None]], cfg: BenchmarkConfig,
                     faults: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per step of each contender, one sample per repeat; within a repeat the contenders run back to
    back, in an order that alternates between repeats so that neither always runs first.

    With `faults`, also the process's minor page faults per step (first writes to freshly mapped memory),
    one sample per repeat and contender, where the platform counts them (Unix).
    """
    names = list(steps)
    for name in names:
        for _ in range(cfg.warmup):
            steps[name]()
    _sync(cfg.device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(cfg.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(cfg.device)
            faults_before = _minor_faults()
            start = time.perf_counter()
            for _ in range(cfg.steps):
                steps[name]()
            _sync(cfg.device)
            samples[name].append((time.perf_counter() - start) / cfg.steps)
            if faults is not None and faults_before is not None:
                faults.setdefault(name, []).append((_minor_faults() - faults_before) / cfg.steps)
    return samples


def _minor_faults() -> int | None:
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def matmul_peak_flops(device: str, *, n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of an n x n x n matmul on `device` (the roofline the model's MAC rate is compared to)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------------------------------------------
# peak memory


def peak_memory_mb(impl: str, mode: str, cfg: BenchmarkConfig) -> float:
    """Peak memory of two steps above what the model and its inputs hold before them, in MiB.

    CUDA: the allocator's peak. CPU: the step runs in a child process and its peak RSS is compared with the
    RSS before the step, after resetting the kernel's high-water mark (a CPU tensor allocator keeps no peak
    statistics).
    """
    if cfg.device.startswith("cuda"):
        model = build_model(impl, cfg)
        step = contender_step(impl, mode, model, cfg)
        step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    payload = json.dumps({"impl": impl, "mode": mode, "config": _config_dict(cfg)})
    code = "import sys, coatvit.benchmark as b; print(b._child_peak_rss(sys.argv[1]))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory child for {impl}/{mode} failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _child_peak_rss(payload: str) -> float:
    data = json.loads(payload)
    cfg = BenchmarkConfig(**{**data["config"], "compile": False})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.tuned_allocator:
        tune_cpu_allocator()
    model = build_model(data["impl"].removesuffix("-compile"), cfg)
    step = contender_step(data["impl"], data["mode"], model, cfg)
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    base = _proc_status_kib("VmRSS")
    # Two steps: the first creates gradients and AdamW moments (counted: training needs them), the second
    # shows whether anything grows further. Freed memory the allocator keeps for reuse is not counted twice.
    step()
    step()
    return max(0.0, (_proc_status_kib("VmHWM") - base) / 1024)


def _proc_status_kib(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    raise RuntimeError(f"cannot read {key} from /proc/self/status: CPU peak memory needs Linux; use --no-memory")


# ----------------------------------------------------------------------------------------------------------------
# the whole run


def run_benchmark(cfg: BenchmarkConfig, *, log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Measures ours and every baseline in `cfg.vs`; one result row per implementation (ours first).

    Ratios (`*_speedup`) are baseline time / our time, per repeat, then the median: above 1 means we are faster.
    """
    from .flops import count_macs
    from .registry import create_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.tuned_allocator and not tune_cpu_allocator():
        raise ValueError("--tuned-allocator needs glibc's malloc (Linux); this platform has another allocator")
    impls = ["ours", *cfg.vs]
    load_before = os.getloadavg()
    n = cfg.matmul_size or (8192 if cfg.device.startswith("cuda") else 2048)
    peak_dtype = AMP_DTYPES[cfg.amp] or torch.float32
    peak = matmul_peak_flops(cfg.device, n=n, dtype=peak_dtype)
    dtype_name = str(peak_dtype).removeprefix("torch.")
    log(f"matmul peak {peak / 1e9:.1f} GFLOP/s ({cfg.device}, {dtype_name}, {n}^3), threads "
        f"{torch.get_num_threads()}, load {_load(load_before)}, allocator {_allocator()}{_native_kernels(cfg.device)}")
    with torch.device("meta"):
        counting = create_model(cfg.model)
    counting.set_fast_path(False)  # the paper's MAC count, not the fast path's masked extra products
    gmacs = count_macs(counting, cfg.img_size) / 1e9
    params = sum(p.numel() for p in counting.parameters())

    rows = {impl: {"model": cfg.model, "impl": impl, "infer_gmacs": round(gmacs, 3),
                   "param_count": round(params / 1e6, 3)} for impl in impls}
    for mode in cfg.modes:
        models = {impl: build_model(impl, cfg) for impl in impls}
        steps = {impl: contender_step(impl, mode, models[impl], cfg) for impl in impls}
        faults: dict[str, list[float]] = {}
        samples = time_interleaved(steps, cfg, faults)
        batch = 1 if mode == "latency" else cfg.batch_size
        ours = samples["ours"]
        for impl in impls:
            t = statistics.median(samples[impl])
            ratio = statistics.median(b / a for a, b in zip(ours, samples[impl])) if impl != "ours" else 1.0
            spread = f"{min(samples[impl]) * 1e3:.1f}-{max(samples[impl]) * 1e3:.1f}"
            row = rows[impl]
            if mode == "latency":
                row.update(latency_step_time=round(t * 1e3, 3), latency_spread=spread)
            else:
                row.update({f"{mode}_samples_per_sec": round(batch / t, 2), f"{mode}_step_time": round(t * 1e3, 3),
                            f"{mode}_batch_size": batch, f"{mode}_img_size": _img(cfg.img_size),
                            f"{mode}_spread": spread})
            row[f"{mode}_speedup"] = round(ratio, 3)  # how many times faster ours is than this row (ours: 1)
            page_faults = ""
            if impl in faults:
                row[f"{mode}_page_faults"] = round(statistics.median(faults[impl]))
                page_faults = f"  {row[f'{mode}_page_faults']} page faults/step"
            log(f"{mode:<7} {impl:<14} {batch / t:9.2f} img/s  {t * 1e3:9.1f} ms/step  (spread {spread} ms)"
                + page_faults + ("" if impl == "ours" else f"  ours is {ratio:.2f}x faster"))
        for other in ("timm", "timm-compile"):  # ours compiled against timm eager and compiled, per repeat
            if "ours-compile" in samples and other in samples:
                pair = statistics.median(b / a for a, b in zip(samples["ours-compile"], samples[other]))
                log(f"{mode:<7} ours-compile is {pair:.2f}x faster than {other}")
        if mode == "infer":
            mac_rate = gmacs * 1e9 * cfg.batch_size / statistics.median(ours)
            for impl in impls:
                rate = gmacs * 1e9 * cfg.batch_size / statistics.median(samples[impl])
                rows[impl]["mac_fraction_of_matmul_peak"] = round(rate / (peak / 2), 3)
            log(f"ours: {mac_rate / 1e9:.1f} GMAC/s = {mac_rate / (peak / 2):.0%} of the matmul peak")
        if cfg.peak_memory and mode in ("infer", "train"):
            for impl in impls:
                rows[impl][f"{mode}_peak_mem_mb"] = round(peak_memory_mb(impl, mode, cfg), 1)
            log(f"{mode:<7} peak memory, MiB: " + ", ".join(f"{impl} {rows[impl][f'{mode}_peak_mem_mb']:.0f}"
                                                           for impl in impls))
        del models, steps
    load_after = os.getloadavg()
    env = _environment(cfg, peak, load_before, load_after)
    return [{**rows[impl], **env} for impl in impls]


def _environment(cfg: BenchmarkConfig, peak: float, load_before, load_after) -> dict[str, Any]:
    try:
        from importlib.metadata import version

        timm_version = version("timm")
    except Exception:  # timm is optional
        timm_version = ""
    return {
        "matmul_peak_gflops": round(peak / 1e9, 1), "device": cfg.device, "threads": torch.get_num_threads(),
        "amp": cfg.amp, "channels_last": cfg.channels_last, "compile": cfg.compile, "compile_mode": cfg.compile_mode,
        "freeze": cfg.freeze,
        "repeats": cfg.repeats, "load_before": _load(load_before), "load_after": _load(load_after),
        "torch": torch.__version__, "timm": timm_version, "cpu": _cpu_name(cfg.device), "allocator": _allocator(),
    }


def _allocator() -> str:
    return "tuned" if allocator_tuned() else "default"


def _native_kernels(device: str) -> str:
    """', native kernels on' or '... off (why)' on a CPU (whether 'ours' runs `coatvit.native`), then the same for
    `coatvit.onednn`'s linear layers; else ''."""
    if not device.startswith("cpu"):
        return ""
    from . import native, onednn

    if not native.enabled():
        line = f", native kernels off ({native.ENV}=0)"
    else:
        line = ", native kernels on" if native.available() else f", native kernels off ({native.failure()})"
    if not onednn.enabled():
        return line + f", oneDNN linear off ({onednn.ENV}=0)"
    return line + (", oneDNN linear on" if onednn.available() else ", oneDNN linear off (unavailable)")


def _load(load: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in load)


def _img(size: tuple[int, int]) -> int | str:
    return size[0] if size[0] == size[1] else f"{size[0]}x{size[1]}"


def _cpu_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _config_dict(cfg: BenchmarkConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Appends rows to a CSV with timm's benchmark column names (header written when the file is new)."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
