"""Process-wide CPU allocator setting that speeds up PyTorch CPU work, ours and any other model's.

PyTorch's CPU tensors come from the C library's `malloc`. With glibc's defaults, every block above a dynamic
threshold (128 KiB at start, raised to at most 32 MiB as blocks are freed) is a fresh `mmap`, and freed memory at
the top of the heap goes back to the OS; the next tensor of that size then pays a page fault per 4 KiB page while
it is first written. timm's CoaT port takes about 200,000 such faults per forward pass at batch 16 (coat_lite_tiny
219,000, coat_tiny 194,000: about 800 MiB of fresh pages) and a third of its CPU time with them; our fast path,
working in cache-sized chunks, takes none at inference, but about 340,000 per training step, as timm does.

`tune_cpu_allocator()` raises glibc's mmap and trim thresholds to 1 GiB with `mallopt`, so freed blocks are reused
instead of unmapped: in `coatvit benchmark` the page faults per step drop to zero for both implementations. The
cost is that memory freed by the process stays with it (the resident size stays at its high-water mark), as with
any caching allocator. The `coatvit` commands that train or run models call it at start-up unless
`COATVIT_TUNE_ALLOCATOR=0`; `coatvit benchmark` leaves the allocator alone unless `--tuned-allocator` is given (it
is process-wide, so timm's model measured in the same run gets the same benefit). Measured effect: BENCHMARKS.md.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_THRESHOLD = 1 << 30  # 1 GiB: blocks above it are still mmap'ed and returned to the OS on free

_tuned = False


def allocator_tunable() -> bool:
    """Whether this process's allocator is glibc's (Linux), the one `tune_cpu_allocator` knows how to set."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def tune_cpu_allocator() -> bool:
    """Keep freed CPU memory in the process for reuse; returns whether the setting is in effect.

    Idempotent and process-wide. A no-op returning False on platforms without glibc (macOS, Windows, musl).
    """
    global _tuned
    if _tuned:
        return True
    if not allocator_tunable():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; the mmap threshold also turns off glibc's dynamic adjustment of it
    _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    return _tuned


def allocator_tuned() -> bool:
    """Whether `tune_cpu_allocator` has taken effect in this process."""
    return _tuned


def fresh_pages_for_large_blocks() -> bool:
    """Whether large CPU tensors most likely come as freshly mapped pages: glibc's allocator with its defaults
    (not tuned by `tune_cpu_allocator`, no MALLOC_* variables or glibc.malloc tunables, no preloaded jemalloc,
    tcmalloc or mimalloc). Blocks above its mmap threshold (at most 32 MiB) are then mapped on every allocation
    and cost a page fault per 4 KiB when first written."""
    if _tuned or not allocator_tunable():
        return False
    env = os.environ
    if any(k.startswith("MALLOC_") for k in env) or "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return False
    return not any(name in env.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc"))


def env_switched_off(name: str) -> bool:
    """Whether the environment variable `name` turns its feature off (0/false/no/off; unset means on)."""
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def tune_cpu_allocator_from_env() -> bool:
    """What the `coatvit` commands call at start-up: tune unless COATVIT_TUNE_ALLOCATOR is 0/false/no/off."""
    if env_switched_off("COATVIT_TUNE_ALLOCATOR"):
        return False
    return tune_cpu_allocator()
