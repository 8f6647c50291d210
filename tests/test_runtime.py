"""The CPU allocator setting: it really stops the page faults of re-allocated tensors, the commands that run
models apply it (COATVIT_TUNE_ALLOCATOR=0 opts out), and the benchmark records which allocator it measured.

Each check runs in a fresh interpreter: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap

import pytest

from coatvit import runtime

pytestmark = pytest.mark.skipif(not runtime.allocator_tunable(), reason="the allocator setting needs glibc (Linux)")

# Allocates, writes and frees tensors of a few sizes (each size a few times) and prints the minor page faults of
# the last round of the last size: 120 MiB, 30,720 pages of 4 KiB.
FAULTS = """
import resource, sys, torch
def faults_of_one_round(numel):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(numel)
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for numel in (16 << 20, 4 << 20, 30 << 20):
    for _ in range(4):
        faults = faults_of_one_round(numel)
print(faults)
"""


def _python(code: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_tuning_stops_page_faults_of_reallocated_tensors():
    untuned = int(_python(FAULTS))
    tuned = int(_python("from coatvit.runtime import tune_cpu_allocator\nassert tune_cpu_allocator()\n" + FAULTS))
    # glibc maps a block that big afresh each time by default
    assert untuned > 20_000
    assert tuned < 100


def test_tune_is_idempotent_and_reported():
    out = _python("""
        from coatvit import runtime
        before = runtime.allocator_tuned()
        print(before, runtime.tune_cpu_allocator(), runtime.tune_cpu_allocator(), runtime.allocator_tuned())
    """)
    assert out == "False True True True"


@pytest.mark.parametrize("argv, env, tuned", [
    (["list"], {}, False),  # runs no model
    (["predict", "--model", "coat_test", "--weights", "no-such.pth", "no-such-image.png"], {}, True),
    (["predict", "--model", "coat_test", "--weights", "no-such.pth", "no-such-image.png"], {"COATVIT_TUNE_ALLOCATOR": "0"}, False),
    (["eval", "--model", "coat_test", "--weights", "no-such.pth", "--data", "no-such-dir"], {"COATVIT_TUNE_ALLOCATOR": "off"}, False),
])
def test_commands_that_run_models_tune_the_allocator(argv, env, tuned):
    out = _python(f"""
        import contextlib, io
        from coatvit import runtime
        from coatvit.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main({argv!r})
        print(runtime.allocator_tuned())
    """, env)
    assert out == str(tuned)


@pytest.mark.parametrize("flag, expected", [([], "default"), (["--tuned-allocator"], "tuned")])
def test_benchmark_csv_records_the_allocator(tmp_path, flag, expected):
    path = tmp_path / "speed.csv"
    _python(f"""
        from coatvit.cli import main
        assert main(["benchmark", "--model", "coat_test", "--img-size", "32", "--batch-size", "2", "--vs",
                     "reference", "--modes", "infer", "--repeats", "1", "--steps", "1", "--warmup", "0",
                     "--threads", "1", "--no-memory", "--matmul-size", "128", "--csv", {str(path)!r}, *{flag!r}]) == 0
        print("ok")
    """)
    rows = list(csv.DictReader(path.open()))
    assert [r["impl"] for r in rows] == ["ours", "reference"]
    assert {r["allocator"] for r in rows} == {expected}
