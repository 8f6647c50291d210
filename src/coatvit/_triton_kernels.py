"""The Triton kernels behind `coatvit.kernels` (imported only when they are used; see that module)."""

import triton
import triton.language as tl


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
def layer_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, C, stride_x, stride_y, eps,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last dimension, BLOCK_M rows per program, in fp32 from
    inputs of any float dtype; y is stored in its own dtype (bf16 where a Linear under autocast reads it)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)  # two passes over registers: no cancellation
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
