"""The Triton attention kernels (coatvit.kernels) compute the fast path's attention and its gradients. No GPU here:
the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, read when a kernel is defined, hence a fresh
interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from csv import DictReader

import pytest
import torch

import coatvit
from coatvit import kernels
from coatvit.benchmark import BenchmarkConfig

# Tests that run kernels need triton (CUDA builds of torch bring it); the policy tests do not.
needs_triton = pytest.mark.skipif(not kernels.available(), reason="needs triton installed")


def _child_env(**extra: str) -> dict:
    """This interpreter's environment and import path for a child process, without COATVIT_TRITON."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **extra)
    env.pop(kernels.ENV, None)
    return env


def _interpret(code: str) -> dict:
    env = _child_env(TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_triton
def test_attention_kernels_match_the_eager_fast_path_in_the_interpreter():
    # Head widths 8 and 16 (padded to 16 inside), 19 (CoaT, padded to 32), 40, 64; one head of 32; with and
    # without CRPE; token counts that are not multiples of the kernel's 64-token blocks; fp16/bf16 inputs.
    result = _interpret("""
        import json, torch
        from coatvit import kernels
        from coatvit.model import ConvRelPosEnc, FactorAttnConvRelPosEnc
        torch.manual_seed(0)
        errors = {}
        for B, H, W, C, h in [(2, 5, 7, 64, 8), (2, 9, 9, 128, 8), (2, 4, 6, 152, 8), (1, 3, 3, 320, 8),
                              (1, 2, 3, 512, 8), (2, 9, 11, 32, 1)]:
            attn = FactorAttnConvRelPosEnc(C, h).eval()
            windows = [(3, 2), (5, 3), (7, 3)] if h == 8 else [(3, 1)]
            crpe = ConvRelPosEnc(C // h, windows).eval()
            x = torch.randn(B, 1 + H * W, C) * 2
            with torch.inference_mode():
                qkv = attn.qkv(x)
                for use_crpe in (True, False):
                    c = crpe if use_crpe else None
                    ref = attn.forward_fast(x, (H, W), c)
                    conv_v = c.conv_tokens(qkv[..., 2 * C:], (H, W)) if c else None
                    out = attn.proj(kernels.factor_attention(qkv, h, attn.scale, conv_v))
                    errors[f"{C}/{h}/{use_crpe}"] = (out - ref).abs().max().item()
        qkv = torch.randn(2, 37, 3 * 64)
        for dtype in (torch.float16, torch.bfloat16):
            low = qkv.to(dtype)
            out = kernels.factor_attention(low, 8, 0.35)
            ref = kernels.factor_attention(low.float(), 8, 0.35)  # same rounded inputs, fp32 output
            errors[str(dtype)] = [str(out.dtype), ((out.float() - ref).abs().max() / ref.abs().max()).item()]
        print(json.dumps(errors))
    """)
    for key, err in result.items():
        if key.startswith("torch."):
            dtype, rel = err
            assert dtype == key and rel < 1e-2, (key, err)  # only the output's rounding to 8-11 bits
        else:
            assert err < 1e-5, (key, err)


@needs_triton
def test_models_with_triton_kernels_match_the_default_path_in_the_interpreter():
    # Whole models the way a user turns the kernels on: serial blocks, and parallel blocks with their resizes.
    result = _interpret("""
        import json, torch, coatvit
        from coatvit import kernels
        calls = []
        original = kernels.factor_attention
        kernels.factor_attention = lambda *a, **k: calls.append(1) or original(*a, **k)
        errors = {}
        for name in ("coat_lite_tiny", "coat_tiny"):
            torch.manual_seed(0)
            model = coatvit.create_model(name, num_classes=10).eval()
            x = torch.randn(2, 3, 68, 100)
            with torch.inference_mode():
                ref = model(x)
                kernels.set_enabled(True)
                out = model(x)
                kernels.set_enabled(None)
            errors[name] = [(out - ref).abs().max().item(), len(calls)]
            calls.clear()
        print(json.dumps(errors))
    """)
    assert result["coat_lite_tiny"][0] < 1e-5 and result["coat_lite_tiny"][1] == 7  # 8 serial blocks; the last
    # computes only its class-token row, with eager ops (CoaT.class_token_shortcut)
    assert result["coat_tiny"][0] < 1e-5 and result["coat_tiny"][1] == 8 + 5 * 3  # + 5 of 6 parallel blocks x 3 scales


@needs_triton
def test_attention_kernel_gradients_match_the_eager_fast_path_in_the_interpreter():
    # The backward kernels: gradients of the block input and of every attention and CRPE weight, with and
    # without CRPE, narrow (8, padded to 16), CoaT's 19 (padded to 32) and wide (40) heads, several token blocks.
    result = _interpret("""
        import json, torch
        from coatvit import kernels
        from coatvit.model import ConvRelPosEnc, FactorAttnConvRelPosEnc
        torch.manual_seed(0)
        errors = {}
        for B, H, W, C, h in [(2, 5, 7, 64, 8), (2, 9, 9, 152, 8), (1, 3, 3, 320, 8)]:
            attn = FactorAttnConvRelPosEnc(C, h)
            crpe = ConvRelPosEnc(C // h, [(3, 2), (5, 3), (7, 3)])
            x = torch.randn(B, 1 + H * W, C, requires_grad=True)
            g = torch.randn(B, 1 + H * W, C)
            for c in (crpe, None):
                params = [x, *attn.parameters(), *(c.parameters() if c else [])]

                def grads(use):
                    for p in params:
                        p.grad = None
                    kernels.set_enabled(use)
                    attn(x, (H, W), c).backward(g)
                    kernels.set_enabled(None)
                    return [p.grad.clone() for p in params]

                ref, got = grads(False), grads(True)
                errors[f"{C}/{c is not None}"] = max(((a - b).abs().max() / a.abs().max()).item()
                                                     for a, b in zip(ref, got))
        print(json.dumps(errors))
    """)
    assert len(result) == 6
    for key, err in result.items():
        assert err < 1e-5, (key, err)


@needs_triton
def test_attention_kernels_match_an_einsum_formula_on_a_strided_qkv_in_the_interpreter():
    # A second oracle, written from the equations, and a qkv that is a view with gaps between rows.
    result = _interpret("""
        import json, torch
        from coatvit import kernels
        torch.manual_seed(0)
        B, N, C, h = 2, 70, 64, 4

        def formula(qkv, scale):
            q, k, v = qkv.unflatten(-1, (3, h, C // h)).unbind(2)  # (B, N, h, Ch)
            context = torch.einsum("bnhc,bnhd->bhcd", k.softmax(dim=1), v) * scale
            return torch.einsum("bnhc,bhcd->bnhd", q, context).reshape(B, N, C)

        wide = torch.randn(B, N, 4 * C, requires_grad=True)
        qkv = wide[..., C:]  # unit channel stride, rows 4C apart
        g = torch.randn(B, N, C)
        out = kernels.factor_attention(qkv, h, 0.25)
        out.backward(g)
        got = wide.grad.clone()
        wide.grad = None
        ref = formula(qkv, 0.25)
        ref.backward(g)
        print(json.dumps({"out": (out - ref).abs().max().item(), "grad": (got - wide.grad).abs().max().item(),
                          "untouched": got[..., :C].abs().max().item()}))
    """)
    assert result["out"] < 1e-5 and result["grad"] < 1e-5 and result["untouched"] == 0, result


@needs_triton
def test_training_step_with_triton_kernels_matches_the_default_path_in_the_interpreter():
    # A whole coat_tiny training step (serial and parallel blocks): loss and every parameter's gradient.
    result = _interpret("""
        import json, torch, torch.nn.functional as F, coatvit
        from coatvit import kernels
        torch.manual_seed(0)
        model = coatvit.create_model("coat_tiny", num_classes=10).train()
        x, y = torch.randn(2, 3, 68, 100), torch.tensor([1, 7])

        def step(use):
            model.zero_grad(set_to_none=True)
            kernels.set_enabled(use)
            loss = F.cross_entropy(model(x), y)
            kernels.set_enabled(None)
            loss.backward()
            return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

        (l0, g0), (l1, g1) = step(False), step(True)
        err = max(((g0[n] - g1[n]).abs().max() / (g0[n].abs().max() + 1e-12)).item() for n in g0)
        print(json.dumps({"loss": abs(l0 - l1), "grad": err, "params": len(g0)}))
    """)
    assert result["loss"] < 1e-5 and result["grad"] < 1e-4, result


def test_kernel_mode_follows_the_setting_then_the_environment(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.mode() == "auto" and not kernels.enabled()
    for value, expected in [("1", "on"), ("true", "on"), ("0", "off"), ("no", "off"), ("auto", "auto"), ("", "auto")]:
        monkeypatch.setenv(kernels.ENV, value)
        assert kernels.mode() == expected, value
    monkeypatch.setenv(kernels.ENV, "1")
    kernels.set_enabled(False)
    try:
        assert kernels.mode() == "off"  # the setting wins over the environment
    finally:
        kernels.set_enabled(None)
    monkeypatch.setenv(kernels.ENV, "fast")  # a typo in a GPU speed setting warns and keeps the default
    kernels._warn_unknown.cache_clear()
    with pytest.warns(RuntimeWarning, match="COATVIT_TRITON must be auto, 1 or 0, got 'fast'; using auto"):
        assert kernels.mode() == "auto"


def test_kernel_policy_is_cuda_inference_by_default():
    ampere, volta = (8, 0), (7, 0)
    # auto: CUDA inference on compute capability >= 8.0; never training, never a CPU tensor outside the interpreter
    assert kernels.decide("auto", "cuda", ampere, grad=False, interpreter=False)
    assert kernels.decide("auto", "cuda", (9, 0), grad=False, interpreter=False)
    assert not kernels.decide("auto", "cuda", ampere, grad=True, interpreter=False)
    assert not kernels.decide("auto", "cuda", volta, grad=False, interpreter=False)
    assert not kernels.decide("auto", "cpu", None, grad=False, interpreter=False)
    assert not kernels.decide("auto", "cpu", None, grad=False, interpreter=True)
    # on: every CUDA forward, training included; CPU tensors only under the interpreter
    assert kernels.decide("on", "cuda", volta, grad=True, interpreter=False)
    assert kernels.decide("on", "cpu", None, grad=True, interpreter=True)
    assert not kernels.decide("on", "cpu", None, grad=False, interpreter=False)
    assert not kernels.decide("on", "mps", None, grad=False, interpreter=False)
    # off: never
    assert not kernels.decide("off", "cuda", ampere, grad=False, interpreter=False)
    assert not kernels.decide("off", "cpu", None, grad=False, interpreter=True)


@needs_triton
def test_use_kernels_on_cpu_tensors_needs_the_interpreter_and_mode_on(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(1)
    assert not kernels.use_kernels(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kernels.use_kernels(x)  # auto is for CUDA tensors
    monkeypatch.setenv(kernels.ENV, "1")
    assert kernels.use_kernels(x)
    assert not kernels.use_kernels(x.double())  # the kernels compute in fp32: float64 keeps the eager ops
    kernels.set_enabled(False)
    try:
        assert not kernels.use_kernels(x)
    finally:
        kernels.set_enabled(None)


def test_by_default_a_failed_kernel_launch_warns_once_and_the_eager_ops_take_over(monkeypatch):
    # As on a GPU machine without a C compiler: Triton's first launch raises. `auto` is only a speed choice.
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "_auto_failure", None)
    model = coatvit.create_model("coat_test").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    monkeypatch.setattr(kernels, "decide", lambda *args: True)  # the policy says yes, as for CUDA inference
    monkeypatch.setattr(kernels, "available", lambda: True)  # and triton is there (not needed: nothing launches)
    launches = []

    def broken(*args):
        launches.append(1)
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(kernels, "factor_attention", broken)
    with pytest.warns(RuntimeWarning, match="Triton attention kernels failed .*C compiler.*COATVIT_TRITON=0"):
        with torch.no_grad():
            out = model(x)
    assert torch.equal(out, expected) and len(launches) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            assert torch.equal(model(x), expected)  # no second try, no second warning
    assert len(launches) == 1
    # asked for explicitly, the error stands; so does running out of memory, in either mode
    monkeypatch.setattr(kernels, "_auto_failure", None)
    monkeypatch.setenv(kernels.ENV, "1")
    with pytest.raises(RuntimeError, match="C compiler"), torch.no_grad():
        model(x)
    monkeypatch.delenv(kernels.ENV)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(kernels, "factor_attention", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        model(x)


def test_the_default_cpu_forward_never_imports_triton():
    code = ("import sys, torch, coatvit; m = coatvit.create_model('coat_test').eval(); m(torch.randn(1, 3, 64, 64)); "
            "print('triton' in sys.modules)")
    env = _child_env()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


@needs_triton
def test_benchmark_refuses_triton_where_the_kernels_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="use --device cuda"):
        BenchmarkConfig(model="coat_test", vs=("ours-triton",), device="cpu")
    BenchmarkConfig(model="coat_test", vs=("ours-triton",), device="cuda")  # accepted; run on a GPU
    BenchmarkConfig(model="coat_test", vs=("ours-no-triton",), device="cpu")  # kernels off: runs anywhere


@needs_triton
def test_benchmark_times_ours_against_ours_with_triton_kernels(tmp_path):
    # The A/B a GPU session runs (`--device cuda --vs ours-triton`), here on the interpreter: both rows present.
    env = _child_env(TRITON_INTERPRET="1")
    csv = tmp_path / "speed.csv"
    done = subprocess.run(
        [sys.executable, "-m", "coatvit", "benchmark", "--model", "coat_test", "--batch-size", "1", "--vs",
         "ours-triton", "--modes", "infer", "--repeats", "1", "--steps", "1", "--warmup", "0", "--no-memory",
         "--threads", "1", "--matmul-size", "256", "--csv", str(csv)],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ours-triton" in done.stdout
    with csv.open(newline="") as f:
        rows = list(DictReader(f))
    assert [row["impl"] for row in rows] == ["ours", "ours-triton"]
    assert all(float(row["infer_samples_per_sec"]) > 0 for row in rows)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter tests above run here)")
@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
def test_kernels_on_a_gpu_match_the_default_path(monkeypatch, name):
    # Compiled by Triton for the GPU at hand: logits and every parameter's gradient, fp32, against the eager path.
    torch.manual_seed(0)
    model = coatvit.create_model(name, num_classes=10).cuda().train()
    x, y = torch.randn(4, 3, 224, 160, device="cuda"), torch.tensor([1, 7, 3, 0], device="cuda")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 GEMMs and convs on both paths
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    def step(use):
        model.zero_grad(set_to_none=True)
        kernels.set_enabled(use)
        try:
            logits = model(x)
        finally:
            kernels.set_enabled(None)
        torch.nn.functional.cross_entropy(logits, y).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (l0, g0), (l1, g1) = step(False), step(True)
    assert (l0 - l1).abs().max().item() < 1e-4
    assert max(((g0[n] - g1[n]).abs().max() / (g0[n].abs().max() + 1e-12)).item() for n in g0) < 1e-3


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the policy itself is tested above)")
def test_by_default_a_gpu_runs_the_kernels_for_inference_only(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    calls = []
    forward = kernels._forward
    monkeypatch.setattr(kernels, "_forward", lambda *a: calls.append(1) or forward(*a))
    model = coatvit.create_model("coat_lite_tiny", num_classes=10).cuda()
    x = torch.randn(2, 3, 96, 128, device="cuda")
    with torch.no_grad():
        fast = model.eval()(x)
    assert len(calls) == 7 if torch.cuda.get_device_capability() >= (8, 0) else not calls
    calls.clear()
    kernels.set_enabled(False)
    try:
        with torch.no_grad():
            eager = model(x)
    finally:
        kernels.set_enabled(None)
    assert not calls and (fast - eager).abs().max().item() < 1e-3  # TF32 may be on: both paths' GEMMs round alike
    model.train()(x).sum().backward()
    assert not calls  # training keeps the eager ops unless COATVIT_TRITON=1
