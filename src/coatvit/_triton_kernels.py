"""The Triton kernels behind `coatvit.kernels` (imported only when they are used; see that module)."""

import triton
import triton.language as tl


@triton.jit
def context_kernel(qkv_ptr, ctx_ptr, N, C, Ch, stride_b, stride_n, scale,
                   D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
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
    tl.store(ctx_ptr + ((b * tl.num_programs(1) + j) * D + d[:, None]) * D + d[None, :], ctx)

@triton.jit
def output_kernel(qkv_ptr, ctx_ptr, cv_ptr, out_ptr, N, Ch, heads,
                  stride_b, stride_n, cv_stride_b, cv_stride_n, out_stride_b, out_stride_n,
                  HAS_CRPE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.program_id(2)
    d = tl.arange(0, D)
    mask = (n < N)[:, None] & (d < Ch)[None, :]
    c = j * Ch + d
    q = tl.load(qkv_ptr + b * stride_b + n[:, None] * stride_n + c[None, :], mask=mask, other=0.0)
    q = q.to(tl.float32)
    ctx = tl.load(ctx_ptr + ((b * heads + j) * D + d[:, None]) * D + d[None, :])
    out = tl.dot(q, ctx, input_precision="ieee")  # (BLOCK_N, D)
    if HAS_CRPE:  # image token n reads row n - 1 of DWConv(V); the class token (n = 0) gets nothing
        img = mask & (n >= 1)[:, None]
        cv = tl.load(cv_ptr + b * cv_stride_b + (n[:, None] - 1) * cv_stride_n + c[None, :], mask=img, other=0.0)
        out += q * cv.to(tl.float32)
    tl.store(out_ptr + b * out_stride_b + n[:, None] * out_stride_n + c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)
