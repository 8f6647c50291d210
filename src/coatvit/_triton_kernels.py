"""The Triton kernels behind `coatvit.kernels` (imported only when they are used; see that module)."""

import triton
import triton.language as tl

from .kernels import interpreting


@triton.jit
def context_kernel(qkv_ptr, ctx_ptr, stats_ptr, N, C, Ch, heads, stride_b, stride_n, scale,
                   D: tl.constexpr, BLOCK_N: tl.constexpr):
    """ctx[b, j] = softmax(K_j)^T V_j * scale (D x D, zero-padded head), and the softmax's per-channel maximum
    and sum (stats[b, j, 0] and [b, j, 1]) for the backward pass."""
    # one program per (image, head), heads fastest: programs launched together read the same token rows; 64-bit
    # offsets, as b * stride_b passes 2**31 for large batches
    bj = tl.program_id(0).to(tl.int64)
    j = bj % heads
    b = bj // heads
    d = tl.arange(0, D)
    dmask = d < Ch
    rows = tl.arange(0, BLOCK_N)
    base = qkv_ptr + b * stride_b + j * Ch
    m = tl.full((D,), float("-inf"), tl.float32)  # running max of k per channel
    l = tl.zeros((D,), tl.float32)  # running sum of exp(k - m) per channel
    acc = tl.zeros((D, D), tl.float32)  # running sum of exp(k - m)^T v
    for start in range(0, N, BLOCK_N):
        n = start + rows
        nmask = n < N
        mask = nmask[:, None] & dmask[None, :]
        kb = tl.load(base + C + n[:, None] * stride_n + d[None, :], mask=mask, other=0.0).to(tl.float32)
        kb = tl.where(nmask[:, None], kb, float("-inf"))  # tokens past N weigh exp(-inf) = 0
        m_new = tl.maximum(m, tl.max(kb, axis=0))
        p = tl.exp(kb - m_new[None, :])  # (BLOCK_N, D)
        alpha = tl.exp(m - m_new)  # rescales what was summed under the old maximum
        l = l * alpha + tl.sum(p, axis=0)
        vb = tl.load(base + 2 * C + n[:, None] * stride_n + d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(tl.trans(p), vb, input_precision="ieee")
        m = m_new
    ctx = acc * (scale / l)[:, None]
    tl.store(ctx_ptr + (bj * D + d[:, None]) * D + d[None, :], ctx)
    tl.store(stats_ptr + bj * 2 * D + d, m)
    tl.store(stats_ptr + bj * 2 * D + D + d, l)


@triton.jit
def output_kernel(qkv_ptr, ctx_ptr, cv_ptr, out_ptr, N, Ch, heads,
                  stride_b, stride_n, cv_stride_b, cv_stride_n, out_stride_b, out_stride_n,
                  HAS_CRPE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[b, n, head j] = Q_j ctx_j (+ Q_j * DWConv(V)_j for image tokens), one block of tokens."""
    bj = tl.program_id(0).to(tl.int64)  # (image, head) pairs, heads fastest, as in context_kernel
    j = bj % heads
    b = bj // heads
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    mask = (n < N)[:, None] & (d < Ch)[None, :]
    c = j * Ch + d
    q = tl.load(qkv_ptr + b * stride_b + n[:, None] * stride_n + c[None, :], mask=mask, other=0.0)
    q = q.to(tl.float32)
    ctx = tl.load(ctx_ptr + (bj * D + d[:, None]) * D + d[None, :])
    out = tl.dot(q, ctx, input_precision="ieee")  # (BLOCK_N, D)
    if HAS_CRPE:  # image token n reads row n - 1 of DWConv(V); the class token (n = 0) gets nothing
        img = mask & (n >= 1)[:, None]
        cv = tl.load(cv_ptr + b * cv_stride_b + (n[:, None] - 1) * cv_stride_n + c[None, :], mask=img, other=0.0)
        out += q * cv.to(tl.float32)
    tl.store(out_ptr + b * out_stride_b + n[:, None] * out_stride_n + c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def context_grad_kernel(qkv_ptr, g_ptr, ctx_ptr, dctx_ptr, delta_ptr, N, Ch, heads, stride_b, stride_n,
                        g_stride_b, g_stride_n, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """dctx[b, j] = Q_j^T dOut_j (D x D) over all tokens, and delta[c] = sum_c' ctx[c, c'] dctx[c, c']: the
    sum over tokens that the softmax's backward needs, from two small matrices instead of a pass over K."""
    bj = tl.program_id(0).to(tl.int64)  # (image, head) pairs, heads fastest, as in context_kernel
    j = bj % heads
    b = bj // heads
    d = tl.arange(0, D)
    dmask = d < Ch
    rows = tl.arange(0, BLOCK_N)
    c = j * Ch + d
    acc = tl.zeros((D, D), tl.float32)
    for start in range(0, N, BLOCK_N):
        n = start + rows
        mask = (n < N)[:, None] & dmask[None, :]
        q = tl.load(qkv_ptr + b * stride_b + n[:, None] * stride_n + c[None, :], mask=mask, other=0.0)
        g = tl.load(g_ptr + b * g_stride_b + n[:, None] * g_stride_n + c[None, :], mask=mask, other=0.0)
        acc += tl.dot(tl.trans(q.to(tl.float32)), g.to(tl.float32), input_precision="ieee")
    ctx = tl.load(ctx_ptr + (bj * D + d[:, None]) * D + d[None, :])
    tl.store(dctx_ptr + (bj * D + d[:, None]) * D + d[None, :], acc)
    tl.store(delta_ptr + bj * D + d, tl.sum(ctx * acc, axis=1))


@triton.jit
def input_grad_kernel(qkv_ptr, g_ptr, ctx_ptr, dctx_ptr, delta_ptr, stats_ptr, cv_ptr, dqkv_ptr, dcv_ptr,
                      N, C, Ch, heads, scale, stride_b, stride_n, g_stride_b, g_stride_n, cv_stride_b, cv_stride_n,
                      HAS_CRPE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ, dK, dV (into the (B, N, 3C) gradient of the qkv projection) and dDWConv(V) for one block of tokens.

    dQ = dOut ctx^T (+ dOut * DWConv(V)); dV = scale P dctx; dK = P * (scale V dctx^T - delta), with
    P = softmax(K) recomputed from the forward's per-channel maximum and sum."""
    bj = tl.program_id(0).to(tl.int64)  # (image, head) pairs, heads fastest, as in context_kernel
    j = bj % heads
    b = bj // heads
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    nmask = n < N
    mask = nmask[:, None] & (d < Ch)[None, :]
    c = j * Ch + d
    rows = b * stride_b + n[:, None] * stride_n
    q = tl.load(qkv_ptr + rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
    k = tl.load(qkv_ptr + rows + C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    v = tl.load(qkv_ptr + rows + 2 * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * g_stride_b + n[:, None] * g_stride_n + c[None, :], mask=mask, other=0.0)
    g = g.to(tl.float32)
    ctx = tl.load(ctx_ptr + (bj * D + d[:, None]) * D + d[None, :])
    dctx = tl.load(dctx_ptr + (bj * D + d[:, None]) * D + d[None, :])
    delta = tl.load(delta_ptr + bj * D + d)
    m = tl.load(stats_ptr + bj * 2 * D + d)
    l = tl.load(stats_ptr + bj * 2 * D + D + d)
    p = tl.where(mask, tl.exp(k - m[None, :]) / l[None, :], 0.0)  # softmax(K), (BLOCK_N, D)
    dq = tl.dot(g, tl.trans(ctx), input_precision="ieee")
    if HAS_CRPE:
        img = mask & (n >= 1)[:, None]
        cv_rows = b * cv_stride_b + (n[:, None] - 1) * cv_stride_n + c[None, :]
        cv = tl.load(cv_ptr + cv_rows, mask=img, other=0.0).to(tl.float32)
        dq += g * cv
        tl.store(dcv_ptr + cv_rows, (g * q).to(dcv_ptr.dtype.element_ty), mask=img)
    dv = scale * tl.dot(p, dctx, input_precision="ieee")
    dk = p * (scale * tl.dot(v, tl.trans(dctx), input_precision="ieee") - delta[None, :])
    dty = dqkv_ptr.dtype.element_ty
    tl.store(dqkv_ptr + rows + c[None, :], dq.to(dty), mask=mask)
    tl.store(dqkv_ptr + rows + C + c[None, :], dk.to(dty), mask=mask)
    tl.store(dqkv_ptr + rows + 2 * C + c[None, :], dv.to(dty), mask=mask)


@triton.jit
def _normed_rows(x_ptr, w_ptr, b_ptr, rows, M, C, stride_x, eps, BLOCK_C: tl.constexpr):
    """Rows `rows` of x (any float dtype) and their LayerNorm over the last dimension, both fp32, with the mask of
    the real rows and columns; padding columns are 0 in both."""
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)  # two passes over registers: no cancellation
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    return x, xc * rstd[:, None] * w[None, :] + b[None, :], mask


@triton.jit
def layer_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, C, stride_x, stride_y, eps,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last dimension, BLOCK_M rows per program, in fp32 from
    inputs of any float dtype; y is stored in its own dtype (bf16 where a Linear under autocast reads it)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    _, y, mask = _normed_rows(x_ptr, w_ptr, b_ptr, rows, M, C, stride_x, eps, BLOCK_C)
    cols = tl.arange(0, BLOCK_C)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round(x, dt: tl.constexpr, BY_HAND: tl.constexpr):
    """fp32 x rounded to the nearest dt (ties to even), as PyTorch casts. BY_HAND (the interpreter, which
    truncates fp32 -> bf16) rounds to bf16 with integer operations; a GPU's cast is one instruction."""
    if BY_HAND and dt == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dt)


def _mlp_configs():
    """Tokens per program, hidden units per loop step and warps the autotuner tries (one under the interpreter,
    which cannot time kernels)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_H": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_H": h}, num_warps=w, num_stages=s)
            for m, h, w, s in [(64, 64, 4, 2), (64, 32, 4, 3), (64, 128, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2),
                               (128, 32, 8, 3), (64, 32, 8, 3)]]


def _prune_mlp_configs(configs, named_args, **kwargs):
    """Drop tiles whose fp32 accumulator (tokens x padded channels) would spill registers."""
    width = triton.next_power_of_2(named_args["C"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * width <= 16384]
    return kept or configs[:1]


def _dwconv_configs():
    """Pixels and channels per program and warps the CPE kernel's autotuner tries (the interpreter bypasses it:
    `coatvit.kernels.residual_dwconv`)."""
    return [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
            for p, c, w in [(32, 64, 4), (64, 64, 4), (64, 32, 4), (16, 128, 4)]]


@triton.autotune(configs=_mlp_configs(), key=["C", "H"], prune_configs_by={"early_config_prune": _prune_mlp_configs})
@triton.jit
def residual_mlp_kernel(x_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr, M, C, H, stride_x, stride_y,
                        eps, INTERPRETER: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """y = x + fc2(GELU(fc1(LayerNorm(x)))) for BLOCK_M rows of x per program; the hidden activations stay in
    registers, BLOCK_H units at a time.

    The products take the weights' dtype (w1, w2: bf16/fp16 under autocast, or fp32) with fp32 accumulation, and
    every value the eager ops under autocast would round to that dtype is rounded here too: the normed input, the
    biases, fc1's output, GELU's output, fc2's output; the LayerNorm, GELU (exact erf) and the residual sum are
    fp32. Under the INTERPRETER, whose bf16 products and casts are wrong, bf16 rounding is done by hand and the
    rounded operands are widened to fp32 before the products, which is exact: products of bf16/fp16 values are
    exact in fp32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    x, xn, mask = _normed_rows(x_ptr, nw_ptr, nb_ptr, rows, M, C, stride_x, eps, BLOCK_C)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    dt = w1_ptr.dtype.element_ty
    xn = _round(xn, dt, INTERPRETER)
    if INTERPRETER:
        xn = xn.to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    units = tl.arange(0, BLOCK_H)
    for start in range(0, H, BLOCK_H):
        u = start + units
        umask = u < H  # units past H get weight 0 and bias 0: GELU(0) = 0 adds nothing
        w1 = tl.load(w1_ptr + u[None, :] * C + cols[:, None], mask=umask[None, :] & cmask[:, None], other=0.0)
        b1 = _round(tl.load(b1_ptr + u, mask=umask, other=0.0).to(tl.float32), dt, INTERPRETER).to(tl.float32)
        w2 = tl.load(w2_ptr + cols[None, :] * H + u[:, None], mask=cmask[None, :] & umask[:, None], other=0.0)
        if INTERPRETER:
            w1 = w1.to(tl.float32)
            w2 = w2.to(tl.float32)
        a = _round(tl.dot(xn, w1, input_precision="ieee") + b1[None, :], dt, INTERPRETER).to(tl.float32)
        a = _round(0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476)), dt, INTERPRETER)
        if INTERPRETER:
            a = a.to(tl.float32)
        acc = tl.dot(a, w2, acc, input_precision="ieee")
    b2 = _round(tl.load(b2_ptr + cols, mask=cmask, other=0.0).to(tl.float32), dt, INTERPRETER).to(tl.float32)
    y = x + _round(acc + b2[None, :], dt, INTERPRETER).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _widen(v, ROUND: tl.constexpr, BY_HAND: tl.constexpr):
    """fp32 v rounded to the compute dtype (ROUND 1: bf16, 2: fp16, 0: none) and widened back to fp32."""
    if ROUND == 1:
        v = _round(v, tl.bfloat16, BY_HAND).to(tl.float32)
    elif ROUND == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.autotune(configs=_dwconv_configs(), key=["C", "K", "W"])
@triton.jit
def residual_dwconv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, B, H, W, C, skip, x_stride_b, x_stride_n, y_stride_b,
                           y_stride_n, K: tl.constexpr, ROUND: tl.constexpr, BY_HAND: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = x + DWConv(x) (KxK, zero padding K // 2) for the image tokens of x (B, skip + H*W, C), read in the token
    layout, the leading `skip` tokens copied; BLOCK_P pixels (of the whole batch, images one after another) x
    BLOCK_C channels per program. w holds the taps as (K*K, C), fp32; b (C,), fp32.

    The convolution's inputs, taps and bias are rounded to the compute dtype (ROUND) as a convolution under
    autocast rounds them, the products summed in fp32 and the sum rounded once; the residual sum is in fp32."""
    P = H * W
    q = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # pixel of the batch
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    qmask = q < B * P
    cmask = c < C
    b = q // P
    p = q % P
    py = p // W
    px = p % W
    x_img = x_ptr + (b * x_stride_b + skip * x_stride_n)[:, None] + c[None, :]  # (BLOCK_P, BLOCK_C) row starts
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for ky in tl.static_range(K):
        yy = py + (ky - K // 2)
        row_ok = qmask & (yy >= 0) & (yy < H)
        for kx in tl.static_range(K):
            xx = px + (kx - K // 2)
            ok = row_ok & (xx >= 0) & (xx < W)
            v = tl.load(x_img + ((yy * W + xx) * x_stride_n)[:, None], mask=ok[:, None] & cmask[None, :], other=0.0)
            w = tl.load(w_ptr + (ky * K + kx) * C + c, mask=cmask, other=0.0)
            acc += _widen(v.to(tl.float32), ROUND, BY_HAND) * _widen(w, ROUND, BY_HAND)[None, :]
    acc += _widen(tl.load(b_ptr + c, mask=cmask, other=0.0), ROUND, BY_HAND)[None, :]
    mask = qmask[:, None] & cmask[None, :]
    out = _widen(acc, ROUND, BY_HAND) + tl.load(x_img + (p * x_stride_n)[:, None], mask=mask, other=0.0).to(tl.float32)
    first = mask & (p == 0)[:, None]  # each image's first pixel also copies the image's leading (class) tokens
    for r in range(0, skip):
        lead = tl.load(x_ptr + (b * x_stride_b + r * x_stride_n)[:, None] + c[None, :], mask=first)
        tl.store(y_ptr + (b * y_stride_b + r * y_stride_n)[:, None] + c[None, :], lead, mask=first)
    y_rows = y_ptr + (b * y_stride_b + skip * y_stride_n)[:, None] + c[None, :]
    tl.store(y_rows + (p * y_stride_n)[:, None], out.to(y_ptr.dtype.element_ty), mask=mask)
