/* CPU kernels for CoaT inference; coatvit/native.py compiles this file at first use and calls it through ctypes.
   Eight float32 lanes are one vector (GCC/Clang vector extensions: AVX2 where compiled for it); rows of work are
   split among `threads` OpenMP threads (PyTorch's own OpenMP runtime, loaded before this library). */
#include <stddef.h>
#include <string.h>
typedef float v8 __attribute__((vector_size(32)));

static inline v8 ld(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v8 v) { memcpy(p, &v, sizeof v); }

/* one output pixel, one block of 8 channels: the sum over its window clipped to the grid (no bias) */
static inline v8 conv1(const float *s, long ts, const float *w, int K, int C, int c, int r, int y, int x,
                       int H, int W)
{
    const int P = K / 2;
    const int y0 = y - r < 0 ? 0 : y - r, y1 = y + r >= H ? H - 1 : y + r;
    const int x0 = x - r < 0 ? 0 : x - r, x1 = x + r >= W ? W - 1 : x + r;
    v8 acc[4] = {{0}, {0}, {0}, {0}};  /* one per window row mod 4: independent chains of FMAs */
    for (int iy = y0; iy <= y1; ++iy)
        for (int ix = x0; ix <= x1; ++ix)
            acc[iy & 3] += ld(s + ((long)iy * W + ix) * ts + c)
                           * ld(w + ((long)(iy - y + P) * K + (ix - x + P)) * C + c);
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

static inline void emit(float *d, const float *a, const float *m, int c, v8 acc)
{
    st(d + c, m ? ld(a + c) + ld(m + c) * acc : ld(a + c) + acc);
}

/* Depthwise convolution over the image tokens of CoaT's (B, N, C) token layout, with the sum it feeds fused in:

   dst[b, p, c] = add[b, p, c] + mul[b, p, c] * (bias[c] + sum over taps of w[ky, kx, c] * src[b, p', c])

   over each image's H x W grid, zero-padded; mul NULL means 1. CPE is dst = x + DWConv3x3(x) (add = src); CRPE
   adds Q * DWConv(V) to the attention's output in place (add = dst, mul = q, src = v, read straight from the qkv
   projection's output). Channels are contiguous; token and batch strides count floats. The weights are (K, K, C)
   with the largest window K; channels c..c+7 (block c/8) use the centred kb[c/8] x kb[c/8] taps, so a block of
   3x3 channels skips the zeros a merged 7x7 kernel would multiply. Four neighbouring pixels share each weight
   load and give four independent chains of multiply-adds. Rows of the grid (b, y) are split among the threads. */
void dwconv_tokens(const float *src, long src_bs, long src_ts,
                   const float *w, const float *bias, const int *kb, int K, int C,
                   int B, int H, int W,
                   const float *mul, long mul_bs, long mul_ts,
                   const float *add, long add_bs, long add_ts,
                   float *dst, long dst_bs, long dst_ts, int threads)
{
    const int P = K / 2;
    const int nblk = C / 8;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < (long)B * H; ++row) {
        const long b = row / H;
        const int y = (int)(row % H);
        const float *s = src + b * src_bs;
        const float *mb = mul ? mul + b * mul_bs : NULL;
        for (int j = 0; j < nblk; ++j) {
            const int c = j * 8;
            const int r = kb[j] / 2;
            const int y0 = y - r < 0 ? 0 : y - r, y1 = y + r >= H ? H - 1 : y + r;
            const v8 bv = ld(bias + c);
            int x = 0;
            for (; x < W; ++x) {
                if (x >= r && x + 3 + r < W) break;  /* four whole-width windows from here */
                const long p = (long)y * W + x;
                emit(dst + b * dst_bs + p * dst_ts, add + b * add_bs + p * add_ts, mb ? mb + p * mul_ts : NULL, c,
                     bv + conv1(s, src_ts, w, K, C, c, r, y, x, H, W));
            }
            for (; x + 3 + r < W; x += 4) {
                v8 a0 = bv, a1 = bv, a2 = bv, a3 = bv;
                for (int iy = y0; iy <= y1; ++iy) {
                    const float *sp = s + ((long)iy * W + x - r) * src_ts + c;
                    const float *wp = w + ((long)(iy - y + P) * K + P - r) * C + c;
                    for (int t = 0; t <= 2 * r; ++t) {
                        const v8 wv = ld(wp + (long)t * C);
                        a0 += wv * ld(sp + (long)t * src_ts);
                        a1 += wv * ld(sp + (long)(t + 1) * src_ts);
                        a2 += wv * ld(sp + (long)(t + 2) * src_ts);
                        a3 += wv * ld(sp + (long)(t + 3) * src_ts);
                    }
                }
                const long p = (long)y * W + x;
                float *d = dst + b * dst_bs + p * dst_ts;
                const float *a = add + b * add_bs + p * add_ts;
                const float *m = mb ? mb + p * mul_ts : NULL;
                emit(d, a, m, c, a0);
                emit(d + dst_ts, a + add_ts, m ? m + mul_ts : NULL, c, a1);
                emit(d + 2 * dst_ts, a + 2 * add_ts, m ? m + 2 * mul_ts : NULL, c, a2);
                emit(d + 3 * dst_ts, a + 3 * add_ts, m ? m + 3 * mul_ts : NULL, c, a3);
            }
            for (; x < W; ++x) {
                const long p = (long)y * W + x;
                emit(dst + b * dst_bs + p * dst_ts, add + b * add_bs + p * add_ts, mb ? mb + p * mul_ts : NULL, c,
                     bv + conv1(s, src_ts, w, K, C, c, r, y, x, H, W));
            }
        }
        for (int x = 0; x < W; ++x) {  /* channels past the last whole block of 8: the full K x K window */
            const long p = (long)y * W + x;
            for (int c = nblk * 8; c < C; ++c) {
                float acc = bias[c];
                for (int ky = 0; ky < K; ++ky) {
                    const int iy = y + ky - P;
                    if (iy < 0 || iy >= H) continue;
                    for (int kx = 0; kx < K; ++kx) {
                        const int ix = x + kx - P;
                        if (ix < 0 || ix >= W) continue;
                        acc += w[((long)ky * K + kx) * C + c] * s[((long)iy * W + ix) * src_ts + c];
                    }
                }
                dst[b * dst_bs + p * dst_ts + c] = add[b * add_bs + p * add_ts + c]
                                                   + (mul ? mul[b * mul_bs + p * mul_ts + c] : 1.0f) * acc;
            }
        }
    }
}
