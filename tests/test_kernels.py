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


def _script(name: str, *args: str, interpret: str = "1") -> subprocess.CompletedProcess:
    """benchmarks/<name> run with `args` in a child process, Triton's interpreter on (or off: interpret="0")."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", name)
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          env=_child_env(TRITON_INTERPRET=interpret), timeout=600)


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
            if name == "coat_lite_tiny":  # stage 4's 40-channel heads (padded to 64) on the kernels too
                kernels.EAGER_HEAD_WIDTHS.clear()
                kernels.set_enabled(True)
                with torch.inference_mode():
                    out = model(x)
                kernels.set_enabled(None)
                kernels.EAGER_HEAD_WIDTHS.add(64)
                errors["all-widths"] = [(out - ref).abs().max().item(), len(calls)]
                calls.clear()
        print(json.dumps(errors))
    """)
    # 8 serial blocks; the last computes only its class-token row, with eager ops (CoaT.class_token_shortcut);
    # stage 4's heads (D 64) keep the eager ops by default (kernels.EAGER_HEAD_WIDTHS)
    assert result["coat_lite_tiny"][0] < 1e-5 and result["coat_lite_tiny"][1] == 6
    assert result["all-widths"][0] < 1e-5 and result["all-widths"][1] == 7
    assert result["coat_tiny"][0] < 1e-5 and result["coat_tiny"][1] == 8 + 5 * 3  # + 5 of 6 parallel blocks x 3 scales


@needs_triton
def test_cpe_kernel_matches_the_convolution_in_the_interpreter():
    # x + DWConv(x) for the image tokens: windows 3, 5, 7, odd image sizes, with and without a class token, strided
    # rows, fp32 and 16-bit compute, an empty batch, bad taps.
    result = _interpret("""
        import json, torch, torch.nn.functional as F
        from coatvit import kernels
        torch.manual_seed(0)
        errors = {}
        for B, H, W, C, K, skip in [(2, 5, 7, 24, 3, 1), (1, 9, 4, 40, 7, 1), (3, 6, 6, 19, 5, 0), (2, 1, 3, 8, 3, 1)]:
            x = torch.randn(B, skip + H * W, 3 * C)[..., C:2 * C] * 2  # strided rows
            conv = torch.nn.Conv2d(C, C, K, padding=K // 2, groups=C)
            img = x[:, skip:].transpose(1, 2).reshape(B, C, H, W)
            taps, bias = kernels.depthwise_taps(conv.weight, conv.bias)
            with torch.no_grad():
                ref = x[:, skip:] + conv(img).flatten(2).transpose(1, 2)
                got = kernels.residual_dwconv(x, taps, bias, (H, W), torch.float32)
                errors[f"{K}/{H}x{W}"] = (got[:, skip:] - ref).abs().max().item()
                errors[f"{K}/{H}x{W}/leading"] = float(not torch.equal(got[:, :skip], x[:, :skip]))
                errors[f"{K}/{H}x{W}/shape"] = float(got.shape != x.shape or got.dtype != x.dtype)
                for dtype in (torch.bfloat16, torch.float16):  # as a convolution under autocast: rounded operands
                    low = F.conv2d(img.to(dtype).float(), conv.weight.to(dtype).float(), conv.bias.to(dtype).float(),
                                   padding=K // 2, groups=C).flatten(2).transpose(1, 2).to(dtype).float()
                    got = kernels.residual_dwconv(x, taps, bias, (H, W), dtype)
                    step = low.abs().max().item() * 2 ** -7
                    errors[f"{K}/{H}x{W}/{dtype}"] = (got[:, skip:] - x[:, skip:] - low).abs().max().item() / step
        empty = kernels.residual_dwconv(torch.randn(0, 10, 8), *kernels.depthwise_taps(torch.randn(8, 1, 3, 3), None),
                                        (3, 3), torch.float32)
        errors["empty"] = float(empty.shape != (0, 10, 8))
        try:
            kernels.residual_dwconv(torch.randn(1, 10, 8), torch.randn(6, 8), torch.zeros(8), (3, 3), torch.float32)
            errors["bad-taps"] = 1.0
        except ValueError as e:
            errors["bad-taps"] = float("odd KxK taps (K*K, C)" not in str(e))
        print(json.dumps(errors))
    """)
    assert len(result) == 4 * 5 + 2
    for key, err in result.items():
        # 16-bit: within one bf16 step of the largest output (fp32 sums in another order); fp32: float rounding
        assert err <= (1.0 if "torch." in key else 1e-5), (key, err)


@needs_triton
def test_models_run_the_cpe_kernel_for_every_cpe_in_the_interpreter():
    # Where a user gets it: inference with the kernels on, fp32 and under bf16 autocast, each CPE of a width the
    # policy takes one kernel (coat_lite's 64-320 channels by default; here CoaT's 152 too); the kept taps follow an
    # in-place change of a conv's weight; training keeps the eager convolution.
    result = _interpret("""
        import json, torch, coatvit
        from coatvit import kernels
        default = [kernels.cpe_kernel_for(c) for c in (64, 128, 152, 256, 320)]
        kernels.CPE_ALIGNMENT = 8  # CoaT's 152 channels too
        calls = []
        original = kernels.residual_dwconv
        kernels.residual_dwconv = lambda *a, **k: calls.append(a[-1]) or original(*a, **k)
        out = {}
        for name, size in (("coat_lite_tiny", (68, 100)), ("coat_tiny", (36, 52))):
            torch.manual_seed(0)
            model = coatvit.create_model(name, num_classes=10).eval()
            x = torch.randn(2, 3, *size)
            with torch.no_grad():
                for autocast in (False, True):
                    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                        ref = model(x).float()
                        kernels.set_enabled(True)
                        got = model(x).float()
                        kernels.set_enabled(None)
                    out[f"{name}/{autocast}"] = [(got - ref).abs().max().item() / ref.abs().max().item(),
                                                 sorted(set(map(str, calls))), len(calls)]
                    calls.clear()
                model.cpe1.proj.weight.mul_(-3)  # in place: the kept taps must be rebuilt
                ref = model(x)
                kernels.set_enabled(True)
                got = model(x)
            out[f"{name}/changed"] = (got - ref).abs().max().item() / ref.abs().max().item()
            calls.clear()
            model.train()(x).sum().backward()
            kernels.set_enabled(None)
            out[f"{name}/train"] = len(calls)
        out["default"] = default
        print(json.dumps(out))
    """)
    assert result["default"] == [True, True, False, True, True], result
    # a CPE before each serial block (8), and per scale before each parallel block (coat_tiny: 6 x 3)
    for name, count in (("coat_lite_tiny", 8), ("coat_tiny", 8 + 6 * 3)):
        assert result[f"{name}/False"][1:] == [["torch.float32"], count], result
        assert result[f"{name}/True"][1:] == [["torch.bfloat16"], count], result
        assert result[f"{name}/False"][0] < 1e-5 and result[f"{name}/changed"] < 1e-5, result
        assert result[f"{name}/True"][0] < 0.05, result  # bf16 on both paths; eager bf16 rounds the bias again
        assert result[f"{name}/train"] == 0, result


@needs_triton
def test_layer_norm_kernel_matches_pytorch_in_the_interpreter():
    # Every width CoaT normalizes (64-512, 152 and 216 not powers of two) and an odd one; row counts that are not
    # multiples of a program's rows; strided and empty inputs; fp32/bf16 in and out.
    result = _interpret("""
        import json, torch, torch.nn.functional as F
        from coatvit import kernels
        torch.manual_seed(0)
        errors = {}
        for C in (37, 64, 128, 152, 216, 320, 512):
            w, b = torch.randn(C), torch.randn(C)
            x = torch.randn(3, 29, C) * 3 + 5  # an offset mean: a one-pass variance would lose digits
            for name, t in (("dense", x), ("rows", x[:, :1]), ("strided", x[:, ::2])):
                ref = F.layer_norm(t, (C,), w, b, 1e-6)
                got = kernels.layer_norm(t, w, b, 1e-6)
                errors[f"{C}/{name}"] = [(got - ref).abs().max().item(), list(got.shape) == list(t.shape)]
            # fp32 in, 16-bit out: the fp32 result rounded (to nearest on a GPU and for fp16 here; the interpreter
            # truncates to bf16, so that is checked to one bf16 ulp here and exactly by the GPU test)
            fp32 = kernels.layer_norm(x, w, b, 1e-6)
            half = kernels.layer_norm(x, w, b, 1e-6, torch.float16)
            low = kernels.layer_norm(x, w, b, 1e-6, torch.bfloat16)
            ref = F.layer_norm(x, (C,), w, b, 1e-6)
            errors[f"{C}/bf16-out"] = [((low.float() - ref).abs() / ref.abs().clamp_min(1e-3)).max().item(),
                                       low.dtype == torch.bfloat16 and torch.equal(half, fp32.half())]
            got = kernels.layer_norm(x.bfloat16(), w, b, 1e-6, torch.float32)  # bf16 in, computed in fp32
            ref = F.layer_norm(x.bfloat16().float(), (C,), w, b, 1e-6)
            errors[f"{C}/bf16-in"] = [(got - ref).abs().max().item(), got.dtype == torch.float32]
        empty = kernels.layer_norm(torch.randn(0, 5, 64), torch.ones(64), torch.zeros(64), 1e-6)
        errors["empty"] = [0.0, list(empty.shape) == [0, 5, 64]]
        print(json.dumps(errors))
    """)
    assert len(result) == 7 * 5 + 1
    for key, (err, shape_and_dtype) in result.items():
        assert shape_and_dtype, key
        # bf16 out: within one bf16 ulp (2^-7 relative) of PyTorch's fp32 result
        assert err < (2 ** -7 if key.endswith("bf16-out") else 1e-5), (key, err)


@needs_triton
def test_layer_norm_sweep_checks_every_setting_and_names_the_best_in_the_interpreter():
    # benchmarks/layer_norm_sweep.py as a GPU session runs it, here on the interpreter (timings meaningless)
    done = _script("layer_norm_sweep.py", "--device", "cpu", "--batch-size", "1", "--shapes", "s4-512")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum("elements," in line for line in lines) == 7  # every setting holds a 512-wide row
    assert lines[-1].startswith("best for rows of 512 (padded): NORM_LAUNCH[512] = ("), lines[-1]
    refused = _script("layer_norm_sweep.py", "--device", "cpu", interpret="0")
    assert refused.returncode != 0 and "TRITON_INTERPRET=1" in refused.stderr


@needs_triton
def test_kernel_widths_script_times_each_width_on_the_eager_ops_in_the_interpreter():
    # benchmarks/kernel_widths.py as a GPU session runs it, here on the interpreter (timings meaningless)
    done = _script("kernel_widths.py", "--device", "cpu", "--batch-size", "1", "--img-size", "64", "--repeats", "1",
                   "--steps", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("coat_lite_tiny infer, batch 1, 64 px, cpu: kernels on every head width "), lines
    assert lines[1].startswith("  head width 64 on eager ops: "), lines
    refused = _script("kernel_widths.py", "--device", "cpu", "--eager", "48")
    assert refused.returncode != 0 and "padded head widths 16, 32 or 64; got [48]" in refused.stderr


@needs_triton
def test_layer_norm_kernel_output_dtype_follows_autocast_in_the_interpreter():
    # Under autocast, a block's norm1/norm2 (read only by Linears) write the autocast dtype, the values autocast's
    # fp32 LayerNorm becomes in the Linear's cast; the other norms stay fp32, as autocast makes them. Autograd
    # recording keeps PyTorch's LayerNorm (no backward kernel).
    result = _interpret("""
        import json, torch, coatvit
        from coatvit import kernels
        from coatvit.model import LayerNorm
        torch.manual_seed(0)
        block_norm, stem_norm = LayerNorm(64, 1e-6, feeds_linear=True), LayerNorm(64, 1e-5)
        for norm in (block_norm, stem_norm):
            torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
        x = torch.randn(2, 50, 64)
        calls = []
        original = kernels.layer_norm
        kernels.layer_norm = lambda *a, **k: calls.append(1) or original(*a, **k)
        kernels.set_enabled(True)
        out = {}
        with torch.no_grad():
            with torch.autocast("cpu", torch.bfloat16):
                a, b = block_norm(x), stem_norm(x)
            out["autocast"] = [str(a.dtype), str(b.dtype), len(calls)]
            kernels.set_enabled(False)
            with torch.autocast("cpu", torch.bfloat16):
                ref_a, ref_b = block_norm(x), stem_norm(x)
            kernels.set_enabled(True)
            rel = (a.float() - ref_a.to(torch.bfloat16).float()).abs() / ref_a.abs().clamp_min(1e-3)
            out["same"] = [rel.max().item(),
                           (b - ref_b).abs().max().item()]
            out["plain"] = [str(block_norm(x).dtype), len(calls)]
        calls.clear()
        model = coatvit.create_model("coat_lite_tiny", num_classes=10)
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, 64, 64))
        out["eval_calls"] = len(calls)
        calls.clear()
        model.train()(torch.randn(1, 3, 64, 64)).sum().backward()
        out["train_calls"] = len(calls)
        kernels.set_enabled(None)
        print(json.dumps(out))
    """)
    assert result["autocast"] == ["torch.bfloat16", "torch.float32", 2], result
    assert result["same"][0] < 2 ** -7 and result["same"][1] < 1e-5, result  # within one bf16 ulp, relative
    assert result["plain"] == ["torch.float32", 3], result
    assert result["eval_calls"] >= 4 + 8 * 2 + 1, result  # patch embeddings, 8 blocks' two norms, the final norm
    assert result["train_calls"] == 0, result


@needs_triton
def test_fused_mlp_kernel_rounds_where_autocast_rounds_in_the_interpreter():
    # x + fc2(GELU(fc1(LayerNorm(x)))) against the same arithmetic in float64 with every value rounded to the
    # product dtype where the eager ops under autocast round it: fp32 products exact to float rounding; bf16/fp16
    # products differ only where fp32 summation order moves a value to the neighbouring step. Leaving out one
    # rounding (GELU's output, say) changes ~40% of the outputs, so the bounds are tight.
    result = _interpret("""
        import json, torch
        import torch.nn.functional as F
        from coatvit import kernels
        torch.manual_seed(0)
        def expected(x, nw, nb, w1, b1, w2, b2, dt):
            r = lambda t: t.to(dt).double()
            xn = r(F.layer_norm(x, (x.shape[-1],), nw, nb, 1e-6))
            h = r(xn @ r(w1).T + r(b1))
            o = r(r(F.gelu(h)) @ r(w2).T + r(b2))
            return (x.double() + o).float(), o.abs().max().item()
        out = {}
        for C, H, M in [(64, 512, 154), (152, 608, 45), (256, 1024, 33), (40, 72, 5)]:
            nw, nb = torch.randn(C) * 0.2 + 1, torch.randn(C) * 0.2
            w1, b1 = torch.randn(H, C) / C ** 0.5, torch.randn(H) * 0.1
            w2, b2 = torch.randn(C, H) / H ** 0.5, torch.randn(C) * 0.1
            x = (torch.randn(M, C + 8) * 2)[:, :C]  # rows with a stride (a slice), as the kernel accepts
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                got = kernels.residual_mlp(x, nw, nb, 1e-6, w1, b1, w2, b2, dt)
                ref, mlp_max = expected(x, nw, nb, w1, b1, w2, b2, dt)
                d = (got - ref).abs()
                out[f"{C}-{str(dt)[6:]}"] = [d.max().item() / mlp_max, (d > 0).float().mean().item(),
                                             list(got.shape) == [M, C]]
        empty = kernels.residual_mlp(torch.randn(0, 3, 64), nw[:64], nb[:64], 1e-6, torch.randn(256, 64),
                                     torch.randn(256), torch.randn(64, 256), torch.randn(64), torch.bfloat16)
        out["empty"] = list(empty.shape)
        print(json.dumps(out))
    """)
    assert result.pop("empty") == [0, 3, 64]
    for key, (err, changed, shape) in result.items():
        assert shape, key
        if key.endswith("float32"):
            assert err < 1e-6, (key, err)
        else:  # a step of bf16 (2**-8 relative) or fp16 (2**-11) at most, on few values
            assert err <= (2 ** -7 if "bfloat16" in key else 2 ** -10), (key, err)
            assert changed < 0.03, (key, changed)


@needs_triton
def test_models_run_the_fused_mlp_under_autocast_only_in_the_interpreter():
    # Where a user gets it: inference under bf16 autocast with the kernels on. Each block's MLP of a width in
    # kernels.FUSED_MLP_WIDTHS (64 and 128 by default) is one kernel; fp32 inference and training keep the eager MLP.
    result = _interpret("""
        import json, torch, coatvit
        from coatvit import kernels
        calls = []
        original = kernels.residual_mlp
        kernels.residual_mlp = lambda *a, **k: calls.append(a[0].shape[-1]) or original(*a, **k)
        out = {}
        for name, size in (("coat_lite_tiny", (68, 100)), ("coat_tiny", (36, 52))):
            torch.manual_seed(0)
            model = coatvit.create_model(name, num_classes=10).eval()
            x = torch.randn(2, 3, *size)
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                ref = model(x).float()
                kernels.set_enabled(True)
                model(x)
                out[name + "-default"] = sorted(set(calls)), len(calls)
                calls.clear()
                kernels.FUSED_MLP_WIDTHS.add(256)  # every width the kernel takes
                got = model(x).float()
            out[name] = [(got - ref).abs().max().item() / ref.abs().max().item(), sorted(set(calls)), len(calls)]
            calls.clear()
            with torch.no_grad():
                model(x)
            out[name + "-fp32"] = len(calls)
            with torch.autocast("cpu", torch.bfloat16):
                model.train()(x).float().sum().backward()
            out[name + "-train"] = len(calls)
            kernels.set_enabled(None)
            kernels.FUSED_MLP_WIDTHS.discard(256)
            calls.clear()
        print(json.dumps(out))
    """)
    assert result["coat_lite_tiny-default"] == [[64, 128], 4], result  # stages 1-2, two blocks each
    assert result["coat_tiny-default"] == [[], 0], result  # 152 channels, padded to 256
    # coat_lite_tiny: two blocks in each of stages 1-3 (64, 128, 256 channels); stage 4's 320 stay eager
    assert result["coat_lite_tiny"][1:] == [[64, 128, 256], 6], result
    assert result["coat_tiny"][1:] == [[152], 8 + 6 * 3], result  # 8 serial blocks, 6 parallel x 3 scales
    for name in ("coat_lite_tiny", "coat_tiny"):
        assert result[name][0] < 0.05, result  # bf16 on both paths; the eager LayerNorm's rounding differs on CPU
        assert result[name + "-fp32"] == 0 and result[name + "-train"] == 0, result


@needs_triton
def test_fused_mlp_script_checks_and_times_each_shape_in_the_interpreter():
    # benchmarks/fused_mlp.py as a GPU session runs it, here on the interpreter (timings meaningless)
    done = _script("fused_mlp.py", "--device", "cpu", "--batch-size", "1", "--shapes", "tiny-s3-152")
    assert done.returncode == 0, done.stderr[-3000:]
    line = done.stdout.strip()
    assert line.startswith("tiny-s3-152: batch 1, 197 tokens, C 152, hidden 608: eager "), line
    assert "autotuned 32 tokens x 32 hidden units, 4 warps" in line, line


@needs_triton
def test_cpe_kernel_script_checks_and_times_each_shape_in_the_interpreter():
    # benchmarks/cpe_kernel.py as a GPU session runs it, here on the interpreter (timings meaningless)
    done = _script("cpe_kernel.py", "--device", "cpu", "--batch-size", "1", "--shapes", "lite-s4-320", "tiny-s4-152")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["lite-s4-320", "tiny-s4-152"], lines
    assert lines[0].startswith("lite-s4-320: batch 1, 7x7 tokens, C 320: eager "), lines
    assert all(line.endswith("autotuned none (interpreter)") for line in lines), lines
    # the kernel at every width, 152 channels too (the models' policy keeps the eager ops there): the interpreter's
    # kernel takes a hundred times the eager ops' time here
    kernel_ms = [float(line.split("kernel ")[1].split(" ms")[0]) for line in lines]
    eager_ms = [float(line.split("eager ")[1].split(" ms")[0]) for line in lines]
    assert all(k > 10 * e for k, e in zip(kernel_ms, eager_ms)), lines


@needs_triton
def test_attention_kernel_gradients_match_the_eager_fast_path_in_the_interpreter():
    # The backward kernels: gradients of the block input and of every attention and CRPE weight, with and
    # without CRPE, narrow (8, padded to 16), CoaT's 19 (padded to 32) and wide (40) heads, several token blocks.
    result = _interpret("""
        import json, torch
        from coatvit import kernels
        from coatvit.model import ConvRelPosEnc, FactorAttnConvRelPosEnc
        torch.manual_seed(0)
        kernels.EAGER_HEAD_WIDTHS.clear()  # every head width on the kernels when they are on
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


def test_kernel_policy_is_cuda_batches_by_default():
    ampere, volta, small = (8, 0), (7, 0), kernels.AUTO_MIN_BATCH - 1
    # auto: CUDA inference and training on compute capability >= 8.0 from AUTO_MIN_BATCH images up; never a CPU
    # tensor outside the interpreter
    assert kernels.decide("auto", "cuda", ampere, interpreter=False)
    assert kernels.decide("auto", "cuda", (9, 0), interpreter=False, batch=256)
    assert not kernels.decide("auto", "cuda", (9, 0), interpreter=False, batch=small)
    assert not kernels.decide("auto", "cuda", volta, interpreter=False)
    assert not kernels.decide("auto", "cpu", None, interpreter=False)
    assert not kernels.decide("auto", "cpu", None, interpreter=True)
    # on: every CUDA forward, any batch; CPU tensors only under the interpreter
    assert kernels.decide("on", "cuda", volta, interpreter=False, batch=1)
    assert kernels.decide("on", "cpu", None, interpreter=True, batch=1)
    assert not kernels.decide("on", "cpu", None, interpreter=False)
    assert not kernels.decide("on", "mps", None, interpreter=False)
    # off: never
    assert not kernels.decide("off", "cuda", ampere, interpreter=False)
    assert not kernels.decide("off", "cpu", None, interpreter=True)


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
    monkeypatch.setattr(kernels, "layer_norm", broken)  # the first launch is the patch embedding's LayerNorm
    with pytest.warns(RuntimeWarning, match="Triton kernels failed .*C compiler.*COATVIT_TRITON=0"):
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
    monkeypatch.setattr(kernels, "layer_norm", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        model(x)


def test_a_failed_fused_mlp_launch_warns_once_and_the_eager_mlp_runs(monkeypatch):
    # The fused MLP's launch fails the way the other kernels' can (Mlp.residual): by default the eager ops give
    # the same sub-layer; asked for explicitly (COATVIT_TRITON=1), the error stands.
    from coatvit.model import DropPath, LayerNorm, Mlp

    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "_auto_failure", None)
    torch.manual_seed(0)
    mlp, norm, drop = Mlp(64, 256).eval(), LayerNorm(64, 1e-6, feeds_linear=True).eval(), DropPath(0.1).eval()
    x = torch.randn(2, 50, 64)
    launches = []

    def broken(*args):
        launches.append(1)
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(Mlp, "fused_ok", lambda *args: True)  # as for CUDA inference under autocast
    monkeypatch.setattr(kernels, "residual_mlp", broken)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected = x + mlp(norm(x))
        with pytest.warns(RuntimeWarning, match="Triton kernels failed .*C compiler"):
            out = mlp.residual(x, norm, drop, fast=True)
        assert torch.equal(out, expected) and len(launches) == 1
        assert torch.equal(mlp.residual(x, norm, drop, fast=False), expected) and len(launches) == 1
        monkeypatch.setattr(kernels, "_auto_failure", None)
        monkeypatch.setenv(kernels.ENV, "1")
        with pytest.raises(RuntimeError, match="C compiler"):
            mlp.residual(x, norm, drop, fast=True)


def test_a_failed_cpe_kernel_launch_warns_once_and_the_eager_cpe_runs(monkeypatch):
    # The CPE kernel's launch fails the way the other kernels' can (ConvPosEnc): by default the eager ops give the
    # same sum; asked for explicitly (COATVIT_TRITON=1), the error stands.
    from coatvit import model as coat_model

    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "_auto_failure", None)
    torch.manual_seed(0)
    cpe = coat_model.ConvPosEnc(64).eval()
    x = torch.randn(2, 1 + 5 * 7, 64)
    launches = []

    def broken(*args):
        launches.append(1)
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    with torch.no_grad():
        expected = cpe(x, (5, 7))
        taps = kernels.depthwise_taps(cpe.proj.weight, cpe.proj.bias)
        monkeypatch.setattr(coat_model, "kernel_conv_taps", lambda *args: taps)  # as for CUDA inference
        monkeypatch.setattr(kernels, "residual_dwconv", broken)
        with pytest.warns(RuntimeWarning, match="Triton kernels failed .*C compiler"):
            out = cpe(x, (5, 7))
        assert torch.equal(out, expected) and len(launches) == 1
        monkeypatch.setattr(kernels, "_auto_failure", None)
        monkeypatch.setenv(kernels.ENV, "1")
        with pytest.raises(RuntimeError, match="C compiler"):
            cpe(x, (5, 7))


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
    monkeypatch.setattr(kernels, "EAGER_HEAD_WIDTHS", set())  # every head width on the kernels
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
def test_by_default_a_gpu_runs_the_kernels_for_batches_in_inference_and_training(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    calls, norms, convs = [], [], []
    forward, layer_norm, dwconv = kernels._forward, kernels.layer_norm, kernels.residual_dwconv
    monkeypatch.setattr(kernels, "_forward", lambda *a: calls.append(1) or forward(*a))
    monkeypatch.setattr(kernels, "layer_norm", lambda *a: norms.append(1) or layer_norm(*a))
    monkeypatch.setattr(kernels, "residual_dwconv", lambda *a: convs.append(1) or dwconv(*a))
    model = coatvit.create_model("coat_lite_tiny", num_classes=10).cuda()
    x = torch.randn(kernels.AUTO_MIN_BATCH, 3, 96, 128, device="cuda")
    ampere = torch.cuda.get_device_capability() >= (8, 0)
    with torch.no_grad():
        fast = model.eval()(x)
    # stage 4's heads (D 64) eager; the CPE kernel before each of the 8 blocks
    assert (len(calls), len(norms), len(convs)) == ((6, 21, 8) if ampere else (0, 0, 0))
    calls.clear(), norms.clear(), convs.clear()
    kernels.set_enabled(False)
    try:
        with torch.no_grad():
            eager = model(x)
    finally:
        kernels.set_enabled(None)
    assert not calls and not norms and not convs
    assert (fast - eager).abs().max().item() < 1e-3  # TF32 may be on: both paths' GEMMs round alike
    with torch.no_grad():
        model(x[:1])
    assert not calls and not norms and not convs  # batch 1: the eager ops, faster while the GPU waits on the CPU
    model.train()(x).sum().backward()
    assert len(calls) == (6 if ampere else 0) and not norms and not convs  # training: the attention kernels (the
    # last block's class-token row and stage 4 aside, as in inference), PyTorch's LayerNorm and convolutions
    mlps = []
    residual_mlp = kernels.residual_mlp
    monkeypatch.setattr(kernels, "residual_mlp", lambda *a: mlps.append(1) or residual_mlp(*a))
    norms.clear()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        model.eval()(x)
        assert (len(mlps), len(norms)) == ((4, 17) if ampere else (0, 0))  # stages 1-2: norm2 in the fused MLP
        mlps.clear()
        model(x[:1])
    assert not mlps


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter tests above run here)")
def test_fused_mlp_kernel_on_a_gpu_matches_the_eager_ops_under_autocast():
    # Compiled for the GPU at hand (tensor-core bf16 products, autotuned tiles) against the eager ops under
    # autocast: the same roundings, so few values a bf16 step apart, none further
    torch.manual_seed(0)
    for C, H in ((64, 512), (128, 1024), (152, 608), (256, 1024)):
        x = torch.randn(8, 785, C, device="cuda") * 2
        norm, fc1, fc2 = (m.cuda() for m in (torch.nn.LayerNorm(C, eps=1e-6), torch.nn.Linear(C, H),
                                             torch.nn.Linear(H, C)))
        with torch.no_grad():
            torch.nn.init.normal_(norm.weight, 1, 0.2), torch.nn.init.normal_(norm.bias, 0, 0.2)
            with torch.autocast("cuda", torch.bfloat16):
                ref = x + fc2(torch.nn.functional.gelu(fc1(norm(x))))
            got = kernels.residual_mlp(x, norm.weight, norm.bias, 1e-6, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                                       torch.bfloat16)
        d, mlp_max = (got - ref).abs(), (ref - x).abs().max().item()
        assert d.max().item() <= 2 ** -7 * mlp_max, (C, d.max().item(), mlp_max)
        assert (d > 0).float().mean().item() < 0.03, C


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter tests above run here)")
def test_cpe_kernel_on_a_gpu_matches_the_eager_convolution(monkeypatch):
    # Compiled for the GPU at hand (autotuned tiles): the CPE as the models call it, kernels on against off, fp32
    # and under bf16 autocast, at CoaT's widths and 224-px token grids
    from coatvit.model import ConvPosEnc

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions on the eager path
    torch.manual_seed(0)
    monkeypatch.setattr(kernels, "CPE_ALIGNMENT", 8)  # CoaT's 152 channels on the kernel too
    for side, C in ((56, 64), (28, 152), (14, 256), (7, 320)):
        cpe = ConvPosEnc(C).cuda().eval()
        x = torch.randn(8, 1 + side * side, C, device="cuda")
        for autocast in (False, True):
            got = {}
            for use in (False, True):
                kernels.set_enabled(use)
                try:
                    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                        got[use] = cpe(x, (side, side))
                finally:
                    kernels.set_enabled(None)
            eager, fast = got[False], got[True]
            assert fast.dtype == eager.dtype and fast.shape == eager.shape and torch.equal(fast[:, 0], x[:, 0])
            conv_max = (eager - x).abs().max().item()
            bound = 2 ** -6 * conv_max if autocast else 1e-4  # bf16: the eager ops round the bias sum once more
            assert (fast - eager).abs().max().item() <= bound, (side, C, autocast)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter tests above run here)")
def test_layer_norm_kernel_on_a_gpu_matches_pytorch_and_rounds_to_nearest():
    torch.manual_seed(0)
    for C in (64, 152, 320, 512):
        w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
        x = torch.randn(4, 3137, C, device="cuda") * 3 + 5
        fp32 = kernels.layer_norm(x, w, b, 1e-6)
        assert (fp32 - torch.nn.functional.layer_norm(x, (C,), w, b, 1e-6)).abs().max().item() < 1e-4
        low, rounded = kernels.layer_norm(x, w, b, 1e-6, torch.bfloat16).float(), fp32.to(torch.bfloat16).float()
        # rounded to nearest: the two compiled variants' fp32 values differ in the last bits only, which moves a
        # few values to the neighbouring bf16 (5e-5 of them on an H100); truncation would change about half
        changed = (low != rounded).float().mean().item()
        assert changed < 1e-3, (C, changed)
        assert (low - rounded).abs().max().item() <= 2 ** -7 * rounded.abs().max().item(), C
    model = coatvit.create_model("coat_tiny", num_classes=10).cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):  # the GPU default: both kernels, bf16 norms
        fast = model(x).float()
        kernels.set_enabled(False)
        try:
            eager = model(x).float()
        finally:
            kernels.set_enabled(None)
    assert (fast - eager).abs().max().item() < 0.05 * eager.abs().max().item()  # bf16 AMP on both paths
