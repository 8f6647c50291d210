"""The benchmark harness: its configuration checks, its rows and CSV, and the `coatvit benchmark` command.

Timings themselves are never asserted (they depend on the machine); the structure and the bookkeeping are."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import re

import pytest
import torch

from coatvit import benchmark
from coatvit.cli import main
from coatvit.flops import count_macs
from coatvit.registry import create_model

TINY = dict(model="coat_test", batch_size=2, img_size=(32, 32), repeats=2, steps=1, warmup=0, threads=1,
            peak_memory=False, matmul_size=256)


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("bad, message", [
    (dict(vs=("tim",)), "unknown baseline"),
    (dict(modes=("inference",)), "modes must be"),
    (dict(modes=()), "modes must be"),
    (dict(amp="fp8"), "amp must be"),
    (dict(batch_size=0), "must be >= 1"),
    (dict(img_size=(32,)), "img_size must be"),
    (dict(freeze=True, vs=("timm",)), "--freeze applies to compiled models"),
    (dict(compile_mode="max-autotune", vs=("timm",)), "--compile-mode applies to compiled models"),
    (dict(compile=True, compile_mode="fastest"), "compile mode must be one of"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        benchmark.BenchmarkConfig(**{**TINY, **bad})


def test_run_benchmark_rows_have_timm_columns_and_ratios():
    rows = benchmark.run_benchmark(benchmark.BenchmarkConfig(**TINY, vs=("reference",)))
    assert [r["impl"] for r in rows] == ["ours", "reference"]
    for row in rows:
        for key in ("infer_samples_per_sec", "infer_step_time", "train_samples_per_sec", "train_step_time",
                    "latency_step_time"):
            assert row[key] > 0, key
        assert row["infer_batch_size"] == row["train_batch_size"] == 2
        assert row["infer_img_size"] == 32 and row["param_count"] == round(61_678 / 1e6, 3)
        assert 0 <= row["mac_fraction_of_matmul_peak"] < 1  # a 61k-parameter model is far from the peak
        assert row["threads"] == 1 and row["repeats"] == 2
    assert rows[0]["infer_speedup"] == 1.0 and rows[1]["infer_speedup"] > 0
    with torch.device("meta"):
        reference = create_model("coat_test")
    reference.set_fast_path(False)
    assert rows[0]["infer_gmacs"] == round(count_macs(reference, (32, 32)) / 1e9, 3)


def test_compiled_pair_is_compared_directly(monkeypatch):
    # ours-compile against timm eager and timm-compile (the "faster than timm + torch.compile"), per mode
    # (compiling itself is replaced by the identity: inductor's C++ build would take minutes here).
    pytest.importorskip("timm")
    monkeypatch.setattr(benchmark, "compile_model", lambda model, cfg: model)
    lines = []
    benchmark.run_benchmark(benchmark.BenchmarkConfig(**{**TINY, "modes": ("infer", "latency")},
                                                      vs=("timm-compile", "ours-compile", "timm")), log=lines.append)
    pairs = [line for line in lines if "ours-compile is" in line]
    assert [(p.split()[0], p.split()[-1]) for p in pairs] == [
        ("infer", "timm"), ("infer", "timm-compile"), ("latency", "timm"), ("latency", "timm-compile")]
    assert all(float(p.split()[3].rstrip("x")) > 0 for p in pairs)


def test_vs_timm_builds_timm_model_for_our_own_variant():
    # coat_test is not a timm name: timm's CoaT class is built from our config, with the same parameter count.
    cfg = benchmark.BenchmarkConfig(**TINY, vs=("timm",), modes=("infer",))
    timm_model = benchmark.build_model("timm", cfg)
    assert type(timm_model).__module__.startswith("timm.")
    assert sum(p.numel() for p in timm_model.parameters()) == 61_678
    rows = benchmark.run_benchmark(cfg)
    assert rows[1]["impl"] == "timm" and rows[1]["infer_speedup"] > 0 and "train_step_time" not in rows[1]


@pytest.mark.parametrize("impl, module", [("ours-no-native", "native"), ("ours-no-onednn", "onednn")])
def test_ours_no_native_and_no_onednn_contenders_run_with_their_switch_off(monkeypatch, impl, module):
    switch = importlib.import_module(f"coatvit.{module}")
    seen = []
    real = benchmark.make_step

    def spying_step(mode, model, cfg):
        step = real(mode, model, cfg)
        return lambda: (seen.append(switch.enabled()), step())

    monkeypatch.setattr(benchmark, "make_step", spying_step)
    cfg = benchmark.BenchmarkConfig(**{**TINY, "repeats": 1}, vs=(impl,), modes=("latency",))
    steps = {name: benchmark.contender_step(name, "latency", benchmark.build_model(name, cfg), cfg)
             for name in ("ours", impl)}
    steps["ours"]()
    steps[impl]()
    steps["ours"]()
    assert seen == [True, False, True]


def test_the_log_says_whether_the_native_kernels_and_onednn_run(monkeypatch):
    from coatvit import native

    for env, expected in (("1", "native kernels on" if native.available() else "native kernels off ("),
                          ("0", "native kernels off (COATVIT_NATIVE=0)")):
        monkeypatch.setenv(native.ENV, env)
        lines = []
        benchmark.run_benchmark(benchmark.BenchmarkConfig(**{**TINY, "repeats": 1}, vs=(), modes=("latency",)),
                                log=lines.append)
        assert expected in lines[0]
    monkeypatch.setenv(native.ENV, "1")
    for env, expected in (("1", "oneDNN linear on"), ("0", "oneDNN linear off (COATVIT_ONEDNN=0)")):
        monkeypatch.setenv("COATVIT_ONEDNN", env)
        lines = []
        benchmark.run_benchmark(benchmark.BenchmarkConfig(**{**TINY, "repeats": 1}, vs=(), modes=("latency",)),
                                log=lines.append)
        assert expected in lines[0]


def test_time_interleaved_alternates_order():
    order = []
    cfg = benchmark.BenchmarkConfig(**{**TINY, "repeats": 4})
    samples = benchmark.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, cfg)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert all(len(v) == 4 and min(v) >= 0 for v in samples.values())


def test_write_csv_appends_under_one_header(tmp_path):
    path = tmp_path / "speed.csv"
    row = {"model": "coat_test", "impl": "ours", "infer_samples_per_sec": 1.5, "unknown_column": 3}
    benchmark.write_csv([row], path)
    benchmark.write_csv([row], path)
    lines = list(csv.DictReader(path.open()))
    assert len(lines) == 2 and lines[0]["infer_samples_per_sec"] == "1.5"
    assert list(lines[0])[:6] == ["model", "impl", "infer_samples_per_sec", "infer_step_time",
                                  "infer_batch_size", "infer_img_size"]


def test_peak_memory_of_a_step_is_measured():
    cfg = benchmark.BenchmarkConfig(**{**TINY, "batch_size": 8, "img_size": (64, 64)})
    payload = json.dumps({"impl": "ours", "mode": "infer", "config": dataclasses.asdict(cfg)})
    infer = benchmark._child_peak_rss(payload)  # in this process: the measurement itself
    train = benchmark.peak_memory_mb("ours", "train", cfg)  # in a child process, as the benchmark runs it
    assert 0 <= infer < train  # training keeps activations, gradients and AdamW moments


def test_matmul_peak_runs_in_the_autocast_dtype():
    lines = []
    rows = benchmark.run_benchmark(benchmark.BenchmarkConfig(**TINY, amp="bfloat16", vs=(), modes=("infer",)),
                                   log=lines.append)
    assert "(cpu, bfloat16, 256^3)" in lines[0] and rows[0]["amp"] == "bfloat16"
    assert rows[0]["matmul_peak_gflops"] > 0


def test_cli_benchmark_writes_csv(tmp_path, capsys):
    path = tmp_path / "b.csv"
    code = main(["benchmark", "--model", "coat_test", "--img-size", "32", "--batch-size", "2", "--vs", "reference",
                 "--modes", "infer", "latency", "--repeats", "1", "--steps", "1", "--warmup", "0", "--threads", "1",
                 "--no-memory", "--csv", str(path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "matmul peak" in out and "(cpu, float32, 2048^3)" in out and "ours is" in out
    rows = list(csv.DictReader(path.open()))
    assert [r["impl"] for r in rows] == ["ours", "reference"] and rows[0]["train_samples_per_sec"] == ""


def test_cli_benchmark_prints_peak_memory(capsys):
    code = main(["benchmark", "--model", "coat_test", "--img-size", "32", "--batch-size", "2", "--vs", "reference",
                 "--modes", "infer", "--repeats", "1", "--steps", "1", "--warmup", "0", "--threads", "1"])
    assert code == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "peak memory" in ln)
    assert re.fullmatch(r"infer +peak memory, MiB: ours -?\d+, reference -?\d+", line), line


@pytest.mark.parametrize("args", [
    ["--vs", "tim"],
    ["--img-size", "16"],
    ["--model", "coat_nope"],
    ["--freeze"],
    ["--compile-mode", "max-autotune"],
])
def test_cli_benchmark_bad_input_exits_2(args, capsys):
    assert main(["benchmark", "--model", "coat_test", "--no-memory", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coatvit benchmark: error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_makes_the_weights_constants_of_the_compiled_inference_graph(freeze):
    # Frozen, a weight changed after compiling no longer reaches the output (what --freeze means for deployment);
    # not frozen, it does. A one-layer model keeps inductor's C++ build short.
    torch._dynamo.reset()  # no graph cached from another test (Dynamo would reuse it for this module)
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    compiled = benchmark.compile_model(layer, benchmark.BenchmarkConfig(**{**TINY, "compile": True, "freeze": freeze}))
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = compiled(x)
        torch.testing.assert_close(before, layer(x))
        layer.bias.add_(1.0)
        after = compiled(x)
    torch.testing.assert_close(after, before if freeze else before + 1.0)


def test_compile_mode_reaches_torch_compile_for_every_compiled_contender(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    cfg = benchmark.BenchmarkConfig(**{**TINY, "compile": True, "compile_mode": "max-autotune",
                                       "vs": ("ours-compile", "reference")})
    for impl in ("ours", "ours-compile", "reference"):
        benchmark.build_model(impl, cfg)
    assert calls == [dict(dynamic=False, mode="max-autotune")] * 2
    benchmark.build_model("ours", benchmark.BenchmarkConfig(**{**TINY, "compile": True}))
    assert calls[-1] == dict(dynamic=False, mode=None)


def test_ours_ckpt_contender_checkpoints_and_keeps_fewer_activations():
    from coatvit.memory import saved_activation_bytes

    cfg = benchmark.BenchmarkConfig(**{**TINY, "vs": ("ours-ckpt",), "img_size": (64, 64)})
    plain, ckpt = benchmark.build_model("ours", cfg), benchmark.build_model("ours-ckpt", cfg)
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    assert ckpt.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    assert saved_activation_bytes(ckpt.train(), x) < saved_activation_bytes(plain.train(), x) / 2
    rows = benchmark.run_benchmark(dataclasses.replace(cfg, modes=("train",)))
    assert [r["impl"] for r in rows] == ["ours", "ours-ckpt"] and rows[1]["train_speedup"] > 0


def test_gemm_floor_records_every_product_and_replays_them(monkeypatch):
    # benchmarks/gemm_floor.py: the products and convolutions of a forward pass, each counted once per call and
    # replayed alone on tensors of the same layout
    import pathlib

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    import gemm_floor
    model = create_model("coat_test").eval()
    recorder = gemm_floor.Recorder()
    with torch.no_grad(), recorder:
        model(torch.randn(2, 3, 32, 32))
    kinds = {gemm_floor.kind(func) for func, _, _ in recorder.calls}
    assert kinds == {"linear GEMMs", "attention products", "convolutions"}
    linears = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    gemm_calls = sum(n for (func, _, _), n in recorder.calls.items() if gemm_floor.kind(func) == "linear GEMMs")
    assert gemm_calls >= linears - 1  # every linear layer once or more (the last block's class-token rows aside)
    # an out= product is replayed with an output of its own layout
    out = torch.empty(6, 4).t()  # (4, 6), transposed strides
    with recorder:
        torch.mm(torch.randn(4, 5), torch.randn(5, 6), out=out)
    key = next(k for k in recorder.calls if k[0] == torch.ops.aten.mm.out)
    rebuilt = dict(gemm_floor.build(key[2]))["out"]
    assert rebuilt.shape == (4, 6) and rebuilt.stride() == out.stride()
    times = gemm_floor.replay_ms(recorder.calls, replays=1)
    assert set(times) == kinds and all(t > 0 for t in times.values())
