/* CPU kernels for CoaT inference; coatvit/native.py compiles this file at first use and calls it through ctypes.
   Eight float32 lanes are one vector (GCC/Clang vector extensions: AVX2 where compiled for it); rows of work are
   split among `threads` OpenMP threads (PyTorch's own OpenMP runtime, loaded before this library). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif
typedef float v8 __attribute__((vector_size(32)));

static inline v8 ld(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v8 v) { memcpy(p, &v, sizeof v); }

static inline void emit(float *d, const float *a, const float *m, int c, v8 acc)
{
    const v8 term = m ? ld(m + c) * acc : acc;
    st(d + c, a ? ld(a + c) + term : term);
}

/* Pixels [x0, x1) of row y of one image's H x W grid, every whole block of 8 channels: `dwconv_tokens`' sum, with
   s, mb, ab, db the image's src, mul, add and dst tokens (mul, add NULL: 1, 0). */
static void dwconv_pixels(const float *s, long src_ts, const float *w, const float *bias, const int *kb, int K,
                          int C, int H, int W, int y, int x0, int x1, const float *mb, long mul_ts, const float *ab,
                          long add_ts, float *db, long dst_ts)
{
    const int P = K / 2;
    const int nblk = C / 8;
    for (int j = 0; j < nblk; ++j) {  /* a block of 8 channels, then groups of four pixels */
        const int c = j * 8;
        const int r = kb[j] / 2;
        const v8 bv = ld(bias + c);
        const int y0 = y - r < 0 ? 0 : y - r, y1 = y + r >= H ? H - 1 : y + r;
        for (int x = x0; x < x1; x += 4) {
            const int xn = x1 - x < 4 ? x1 - x : 4;
            const long p = (long)y * W + x;
            float *d = db + p * dst_ts;
            const float *a = ab ? ab + p * add_ts : NULL;
            const float *m = mb ? mb + p * mul_ts : NULL;
            v8 a0 = bv, a1 = bv, a2 = bv, a3 = bv;
            for (int iy = y0; iy <= y1; ++iy) {
                const float *sr = s + (long)iy * W * src_ts + c;
                const float *wp = w + ((long)(iy - y + P) * K + P - r) * C + c;
                for (int t = 0; t <= 2 * r; ++t) {
                    const v8 wv = ld(wp + (long)t * C);
                    const int ix = x - r + t;  /* the tap's column for the first pixel */
                    if (ix >= 0 && ix + 3 < W) {
                        const float *sp = sr + (long)ix * src_ts;
                        a0 += wv * ld(sp);
                        a1 += wv * ld(sp + src_ts);
                        a2 += wv * ld(sp + 2 * src_ts);
                        a3 += wv * ld(sp + 3 * src_ts);
                        continue;
                    }
                    /* clipped at the grid's left or right edge (or past a last short group's pixels) */
                    if (ix >= 0 && ix < W) a0 += wv * ld(sr + (long)ix * src_ts);
                    if (ix + 1 >= 0 && ix + 1 < W) a1 += wv * ld(sr + (long)(ix + 1) * src_ts);
                    if (ix + 2 >= 0 && ix + 2 < W) a2 += wv * ld(sr + (long)(ix + 2) * src_ts);
                    if (ix + 3 >= 0 && ix + 3 < W) a3 += wv * ld(sr + (long)(ix + 3) * src_ts);
                }
            }
            if (xn < 4) {
                const v8 acc[4] = {a0, a1, a2, a3};
                for (int i = 0; i < xn; ++i)
                    emit(d + i * dst_ts, a ? a + i * add_ts : NULL, m ? m + i * mul_ts : NULL, c, acc[i]);
                continue;
            }
            emit(d, a, m, c, a0);
            emit(d + dst_ts, a ? a + add_ts : NULL, m ? m + mul_ts : NULL, c, a1);
            emit(d + 2 * dst_ts, a ? a + 2 * add_ts : NULL, m ? m + 2 * mul_ts : NULL, c, a2);
            emit(d + 3 * dst_ts, a ? a + 3 * add_ts : NULL, m ? m + 3 * mul_ts : NULL, c, a3);
        }
    }
}

/* Depthwise convolution over the image tokens of CoaT's (B, N, C) token layout, with the sum it feeds fused in:

   dst[b, p, c] = add[b, p, c] + mul[b, p, c] * (bias[c] + sum over taps of w[ky, kx, c] * src[b, p', c])

   over each image's H x W grid, zero-padded; mul NULL means 1, add NULL means 0. CPE is dst = x + DWConv3x3(x)
   (add = src); CRPE adds Q * DWConv(V) to the attention's output in place (add = dst, mul = q, src = v, read
   straight from the qkv projection's output); training runs the plain convolution (add NULL) and, for the input
   gradient, the convolution with the taps flipped. Channels are contiguous; token and batch strides count floats.
   The weights are (K, K, C) with the largest window K; channels c..c+7 (block c/8) use the centred
   kb[c/8] x kb[c/8] taps, so a block of 3x3 channels skips the zeros a merged 7x7 kernel would multiply. Four
   neighbouring pixels share each weight load and give four independent chains of multiply-adds, at the grid's
   edges too (taps outside it skipped per pixel), so every pixel sums bias and taps in one order. Rows of the grid
   (b, y) are split among the threads. */
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
        const float *ab = add ? add + b * add_bs : NULL;
        dwconv_pixels(s, src_ts, w, bias, kb, K, C, H, W, y, 0, W, mb, mul_ts, ab, add_ts, dst + b * dst_bs, dst_ts);
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
                dst[b * dst_bs + p * dst_ts + c] = (ab ? ab[p * add_ts + c] : 0.0f)
                                                   + (mul ? mul[b * mul_bs + p * mul_ts + c] : 1.0f) * acc;
            }
        }
    }
}

/* The weight gradient of `dwconv_tokens`' convolution (training): for each tap (ky, kx) of channel c,

   gw[ky, kx, c] = sum over images b and pixels p of g[b, p, c] * src[b, p shifted by (ky - K/2, kx - K/2), c]

   (zero outside the grid), only over the taps inside each block of 8 channels' own window kb[c/8] (the padded
   zeros of a merged kernel get 0); gw is (K, K, C). gb (C floats) gets the bias gradient, the sum of g over
   images and pixels. Rows (b, y) are split among the threads, each summing into a buffer of its own; the buffers
   are then added in thread order, so a result depends on the thread count only. Returns 0, or -1 when the
   buffers could not be had (gw and gb are then unwritten). */
int dwconv_weight_grad(const float *src, long src_bs, long src_ts, const float *g, long g_bs, long g_ts,
                       const int *kb, int K, int C, int B, int H, int W, float *gw, float *gb, int threads)
{
    const int P = K / 2;
    const int nblk = C / 8;
    const size_t size = (size_t)K * K * C + C;  /* per thread: the taps, then the bias */
    if (threads < 1) threads = 1;
    float *bufs = calloc((size_t)threads * size, sizeof(float));
    if (!bufs) return -1;
    #pragma omp parallel num_threads(threads)
    {
        float *acc = bufs;
#ifdef _OPENMP
        acc += (size_t)omp_get_thread_num() * size;
#endif
        #pragma omp for schedule(static)
        for (long row = 0; row < (long)B * H; ++row) {
            const long b = row / H;
            const int y = (int)(row % H);
            const float *gr = g + b * g_bs + (long)y * W * g_ts;  /* this row's gradient */
            float *bias_acc = acc + size - C;
            for (int x = 0; x < W; ++x) {
                int c = 0;
                for (; c + 8 <= C; c += 8) st(bias_acc + c, ld(bias_acc + c) + ld(gr + (long)x * g_ts + c));
                for (; c < C; ++c) bias_acc[c] += gr[(long)x * g_ts + c];
            }
            for (int j = 0; j < nblk; ++j) {
                const int c = j * 8, r = kb[j] / 2;
                for (int dy = -r; dy <= r; ++dy) {
                    const int iy = y + dy;
                    if (iy < 0 || iy >= H) continue;
                    const float *sr = src + b * src_bs + (long)iy * W * src_ts;
                    for (int dx = -r; dx <= r; ++dx) {
                        const int x0 = dx < 0 ? -dx : 0, x1 = dx > 0 ? W - dx : W;
                        v8 sum[2] = {{0}, {0}};  /* two independent chains */
                        int x = x0;
                        for (; x + 1 < x1; x += 2) {
                            sum[0] += ld(gr + (long)x * g_ts + c) * ld(sr + (long)(x + dx) * src_ts + c);
                            sum[1] += ld(gr + (long)(x + 1) * g_ts + c) * ld(sr + (long)(x + 1 + dx) * src_ts + c);
                        }
                        if (x < x1) sum[0] += ld(gr + (long)x * g_ts + c) * ld(sr + (long)(x + dx) * src_ts + c);
                        float *t = acc + ((long)(dy + P) * K + dx + P) * C + c;
                        st(t, ld(t) + (sum[0] + sum[1]));
                    }
                }
            }
            for (int c = nblk * 8; c < C; ++c)  /* channels past the last whole block of 8: the full K x K window */
                for (int dy = -P; dy <= P; ++dy) {
                    const int iy = y + dy;
                    if (iy < 0 || iy >= H) continue;
                    const float *sr = src + b * src_bs + (long)iy * W * src_ts;
                    for (int dx = -P; dx <= P; ++dx) {
                        float sum = 0.0f;
                        for (int x = dx < 0 ? -dx : 0; x < (dx > 0 ? W - dx : W); ++x)
                            sum += gr[(long)x * g_ts + c] * sr[(long)(x + dx) * src_ts + c];
                        acc[((long)(dy + P) * K + dx + P) * C + c] += sum;
                    }
                }
        }
    }
    for (size_t i = 0; i < size; ++i) {
        float sum = 0.0f;
        for (int t = 0; t < threads; ++t) sum += bufs[(size_t)t * size + i];
        if (i < size - C) gw[i] = sum;
        else gb[i - (size - C)] = sum;
    }
    free(bufs);
    return 0;
}

typedef int v8i __attribute__((vector_size(32)));

static inline v8 splat(float x) { v8 v = {x, x, x, x, x, x, x, x}; return v; }
static inline v8 select(v8i mask, v8 a, v8 b) { return (v8)((mask & (v8i)a) | (~mask & (v8i)b)); }
/* exp of x <= 0 (a softmax's shifted logits) to about 2 ulp: x = n ln2 + r, a degree-6 polynomial in r, times
   2^n put into the exponent bits; below -87 it flushes to exp(-87) ~ 1.6e-38. */
static inline v8 exp8(v8 x)
{
    x = select(x < splat(-87.0f), splat(-87.0f), x);
    const v8 magic = splat(12582912.0f);  /* 1.5 * 2^23: adding it rounds to an integer */
    const v8 t = x * 1.44269504088896341f + magic;
    const v8 n = t - magic;
    const v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v8i bits = ((v8i)t - (v8i)magic) << 23;
    return (v8)((v8i)p + bits);
}
/* the first `width` (1..8) lanes of v to p */
static inline void st_part(float *p, v8 v, int width)
{
    if (width == 8) { st(p, v); return; }
#ifdef __AVX2__
    static const int ramp[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    _mm256_maskstore_ps(p, _mm256_loadu_si256((const __m256i *)(ramp + 8 - width)), (__m256)v);
#else
    float tmp[8];
    memcpy(tmp, &v, sizeof tmp);
    for (int i = 0; i < width; ++i) p[i] = tmp[i];
#endif
}

/* The factorized attention of one image, all heads (C a multiple of 8, heads of ch <= 64 channels):

   out[n, head] = q[n, head] @ (scale * softmax over the N tokens of k[:, head])^T v[:, head]

   q, k and v are read from the image's rows of the qkv projection (q, k, v side by side, rows `ts` floats apart)
   and the result goes to its rows of out (`ots` apart), so no head permute is ever copied. Three passes, each
   over a range so that threads can share one image: `softmax_pass` writes softmax(K)'s numerators E and a copy
   of V to scratch rows of C floats, an 8-float zero tail and padding to a cache line (`scratch_row`), and
   scale / the channels' sums to inv; `context_pass` accumulates each head's (ch x chp) context in register tiles
   of 4 rows x 16 channels (a head's last tile reads into the next head's columns or the zero tail, and only its
   own columns are kept); `output_pass` multiplies tiles of 4 tokens x 16 channels of q by the contexts and stores
   each head's own channels. The backward keeps E and V for all N tokens; the forward (`blocked_contexts`) runs
   the first two passes a block of tokens at a time. */
typedef struct {
    const float *qkv;
    long ts, ots;
    int N, C, heads, ch, chp, nv, cs;
    float scale;
    float *out, *E, *V, *ctx, *inv;
} attention_t;

/* mx[b] <- the maxima over the image's tokens of k's channels c0 + 8 b .. c0 + 8 b + 7 (b < nb), sum[b] <- 0 */
static void channel_maxima(const attention_t *a, int c0, int nb, v8 *mx, v8 *sum)
{
    const float *k = a->qkv + a->C;
    for (int b = 0; b < nb; ++b) {
        mx[b] = ld(k + c0 + 8 * b);
        sum[b] = splat(0.0f);
    }
    for (int n = 1; n < a->N; ++n)
        for (int b = 0; b < nb; ++b) {
            const v8 x = ld(k + n * a->ts + c0 + 8 * b);
            mx[b] = select(x > mx[b], x, mx[b]);
        }
}

/* tokens [n0, n1) of those channels: exp(k - mx) and v to rows n - n0 of E and V (cs floats apart, an 8-float
   zero tail after channel C where the channels reach it), the exps added to sum */
static void numerator_rows(const attention_t *a, int n0, int n1, int c0, int nb, const v8 *mx, v8 *sum, float *E,
                           float *V)
{
    const float *k = a->qkv + a->C, *v = a->qkv + 2 * a->C;
    const long ts = a->ts;
    for (long n = n0; n < n1; ++n) {
        float *e = E + (n - n0) * a->cs, *vv = V + (n - n0) * a->cs;
        for (int b = 0; b < nb; ++b) {
            const int c = c0 + 8 * b;
            const v8 x = exp8(ld(k + n * ts + c) - mx[b]);
            st(e + c, x);
            sum[b] += x;
            st(vv + c, ld(v + n * ts + c));
        }
        if (c0 + 8 * nb == a->C) {
            st(e + a->C, splat(0.0f));
            st(vv + a->C, splat(0.0f));
        }
    }
}

static void softmax_pass(const attention_t *a, int c0, int c1)  /* channels [c0, c1), multiples of 8 */
{
    const int nb = (c1 - c0) / 8;
    v8 mx[nb], sum[nb];  /* this thread's maxima and sums: registers or its own stack, never a shared line */
    channel_maxima(a, c0, nb, mx, sum);
    numerator_rows(a, 0, a->N, c0, nb, mx, sum, a->E, a->V);
    for (int b = 0; b < nb; ++b) st(a->inv + c0 + 8 * b, splat(a->scale) / sum[b]);  /* each sum >= exp(0) */
}

/* M_h[i][j] = rs[o + i] * sum over the `rows` tokens n of A[n, o + i] B[n, o + j] for the heads [h0, h1) (o = h ch;
   rs NULL: 1), each M_h ch x chp floats, rows chp apart; `accumulate`: the sums start from M's values instead of 0
   (a block of tokens after the first, in the same order of additions as one pass over all of them). Rows of A are
   a_ts floats apart, of B b_ts; reads run up to 16 floats past a head's last channel in B (a padded scratch copy)
   and 3 in A. */
static void context_products(const attention_t *a, const float *A, long a_ts, const float *B, long b_ts,
                             const float *rs, float *M, int h0, int h1, int rows, int accumulate)
{
    const int ch = a->ch, chp = a->chp, nv = a->nv;
    for (int h = h0; h < h1; ++h) {
        float *cx = M + (long)h * ch * chp;
        const int o = h * ch;
        if (nv == 1) {  /* heads of up to 8 channels: one tile of 8 rows x 8 channels */
            v8 acc[8];
            for (int r = 0; r < 8; ++r) acc[r] = accumulate && r < ch ? ld(cx + (long)r * chp) : splat(0.0f);
            const float *e = A + o, *vv = B + o;
            for (int n = 0; n < rows; ++n, e += a_ts, vv += b_ts) {
                const v8 v0 = ld(vv);
                for (int r = 0; r < 8; ++r) acc[r] += splat(e[r]) * v0;
            }
            for (int r = 0; r < ch; ++r) st(cx + (long)r * chp, acc[r] * (rs ? rs[o + r] : 1.0f));
            continue;
        }
        for (int c1 = 0; c1 < ch; c1 += 4)
            for (int j = 0; j < nv; j += 2) {
                v8 a00 = splat(0.0f), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
                if (accumulate) {
                    v8 *acc[4][2] = {{&a00, &a01}, {&a10, &a11}, {&a20, &a21}, {&a30, &a31}};
                    for (int r = 0; r < 4 && c1 + r < ch; ++r)
                        for (int b = 0; b < 2 && j + b < nv; ++b)
                            *acc[r][b] = ld(cx + (long)(c1 + r) * chp + 8 * (j + b));
                }
                const float *e = A + o + c1, *vv = B + o + 8 * j;
                for (int n = 0; n < rows; ++n, e += a_ts, vv += b_ts) {
                    const v8 v0 = ld(vv), v1 = ld(vv + 8);
                    const v8 w0 = splat(e[0]), w1 = splat(e[1]), w2 = splat(e[2]), w3 = splat(e[3]);
                    a00 += w0 * v0; a01 += w0 * v1;
                    a10 += w1 * v0; a11 += w1 * v1;
                    a20 += w2 * v0; a21 += w2 * v1;
                    a30 += w3 * v0; a31 += w3 * v1;
                }
                const v8 acc[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
                for (int r = 0; r < 4 && c1 + r < ch; ++r)
                    for (int b = 0; b < 2 && j + b < nv; ++b)
                        st(cx + (long)(c1 + r) * chp + 8 * (j + b), acc[r][b] * (rs ? rs[o + c1 + r] : 1.0f));
            }
    }
}

static void context_pass(const attention_t *a, int h0, int h1)  /* heads [h0, h1) */
{
    context_products(a, a->E, a->cs, a->V, a->cs, a->inv, a->ctx, h0, h1, a->N, 0);
}

/* out[n, o + j] = sum over i of A[n, o + i] M_h[i][j] for the tokens [n_begin, n_end) and every head h (o = h ch,
   M_h as `context_products` writes it); rows of A are ts floats apart, of out o_ts. */
static void tile_products(const attention_t *a, const float *A, long ts, const float *M, float *out, long o_ts,
                          int n_begin, int n_end)
{
    const int ch = a->ch, chp = a->chp, nv = a->nv;
    if (nv == 1) {  /* heads of up to 8 channels: tiles of 8 tokens x 8 channels */
        for (int n0 = n_begin; n0 < n_end; n0 += 8) {
            const int toks = n_end - n0 < 8 ? n_end - n0 : 8;
            long rows[8];
            for (int r = 0; r < 8; ++r) rows[r] = (r < toks ? r : 0) * ts;  /* a short tile repeats its first row */
            const float *q = A + n0 * ts;
            for (int h = 0; h < a->heads; ++h) {
                const float *cx = M + (long)h * ch * chp, *qh = q + h * ch;
                v8 acc[8];
                for (int r = 0; r < 8; ++r) acc[r] = splat(0.0f);
                for (int c1 = 0; c1 < ch; ++c1) {
                    const v8 c0 = ld(cx + (long)c1 * chp);
                    for (int r = 0; r < 8; ++r) acc[r] += splat(qh[rows[r] + c1]) * c0;
                }
                for (int r = 0; r < toks; ++r) st_part(out + (n0 + r) * o_ts + h * ch, acc[r], ch);
            }
        }
        return;
    }
    for (int n0 = n_begin; n0 < n_end; n0 += 4) {  /* a last tile of fewer tokens reads its first row again */
        const int toks = n_end - n0 < 4 ? n_end - n0 : 4;
        const float *q = A + n0 * ts;
        const long t1 = toks > 1 ? ts : 0, t2 = toks > 2 ? 2 * ts : 0, t3 = toks > 3 ? 3 * ts : 0;
        for (int h = 0; h < a->heads; ++h) {
            const float *cx = M + (long)h * ch * chp;
            const int o = h * ch;
            for (int j = 0; j < nv; j += 2) {
                v8 a00 = splat(0.0f), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
                for (int c1 = 0; c1 < ch; ++c1) {
                    const v8 c0 = ld(cx + (long)c1 * chp + 8 * j), cc = ld(cx + (long)c1 * chp + 8 * j + 8);
                    const float *qq = q + o + c1;
                    const v8 w0 = splat(qq[0]), w1 = splat(qq[t1]), w2 = splat(qq[t2]), w3 = splat(qq[t3]);
                    a00 += w0 * c0; a01 += w0 * cc;
                    a10 += w1 * c0; a11 += w1 * cc;
                    a20 += w2 * c0; a21 += w2 * cc;
                    a30 += w3 * c0; a31 += w3 * cc;
                }
                const v8 acc[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
                for (int r = 0; r < toks; ++r)
                    for (int b = 0; b < 2 && j + b < nv; ++b) {
                        const int c = 8 * (j + b);
                        st_part(out + (n0 + r) * o_ts + o + c, acc[r][b], ch - c < 8 ? ch - c : 8);
                    }
            }
        }
    }
}

static void output_pass(const attention_t *a, int n_begin, int n_end)  /* tokens [n_begin, n_end) */
{
    tile_products(a, a->qkv, a->ts, a->ctx, a->out, a->ots, n_begin, n_end);
}

/* floats per scratch row of C channels and an 8-float zero tail, a whole number of 64-byte lines: rows that
   threads write side by side (channel ranges of multiples of 16 floats) then share no cache line */
static inline long scratch_row(int C) { return (C + 8 + 15) / 16 * 16; }

/* scratch floats of one image: E, V, the contexts (and 16 floats a last tile may read past them), inv; each part
   a multiple of 16 floats, so each starts on a line of a 64-byte aligned block (`alloc_lines`) */
static size_t attention_scratch(int N, int C, int heads)
{
    const int ch = C / heads, chp = (ch + 7) / 8 * 8;
    return (size_t)2 * N * scratch_row(C) + (size_t)heads * ch * chp + 16 + (size_t)(C + 15) / 16 * 16;
}

/* n floats starting on a 64-byte boundary; *raw is what to free (NULL, and NULL returned, without memory) */
static float *alloc_lines(size_t n, void **raw)
{
    *raw = malloc(sizeof(float) * n + 64);
    return *raw ? (float *)(((uintptr_t)*raw + 63) & ~(uintptr_t)63) : NULL;
}

static attention_t attention_setup(const float *qkv, long ts, int N, int C, int heads, float scale, float *out,
                                   long ots, float *scratch)
{
    attention_t a = {qkv, ts, ots, N, C, heads, C / heads, (C / heads + 7) / 8 * 8, 0, (int)scratch_row(C), scale,
                     out, scratch, NULL, NULL, NULL};
    a.nv = a.chp / 8;
    a.V = a.E + (size_t)N * a.cs;
    a.ctx = a.V + (size_t)N * a.cs;
    a.inv = a.ctx + (size_t)heads * a.ch * a.chp + 16;
    return a;
}

/* One image's softmax and contexts, the passes split among the threads of the enclosing parallel region (channels,
   then heads; each loop ends in a barrier). */
static void shared_context_passes(const attention_t *a)
{
    #pragma omp for schedule(static)
    for (int c = 0; c < a->C; c += 8) softmax_pass(a, c, c + 8);
    #pragma omp for schedule(dynamic)
    for (int h = 0; h < a->heads; ++h) context_pass(a, h, h + 1);
}

/* tokens whose softmax numerators and values the forward keeps in scratch at a time (`blocked_contexts`) */
#define TOKEN_BLOCK 64

/* The contexts of the heads [h0, h1) of one image (the forward's softmax and context passes) without scratch rows
   for all N tokens: the maxima of the heads' channels over the tokens, then blocks of TOKEN_BLOCK tokens whose
   numerators exp(k - max) and values go to the scratch rows E and V (TOKEN_BLOCK + 1 rows of a->cs floats each,
   zeroed before the first call) and are multiplied into the contexts while they are still in the cache; last,
   each context row times scale / its channel's sum. The same operations in the same order as `softmax_pass` and
   `context_pass`, so the same bits, with a pass over the image's numerators and values from memory saved.
   Works on the groups of 8 channels that cover the heads' own. */
static void blocked_contexts(const attention_t *a, int h0, int h1, float *E, float *V)
{
    if (h0 >= h1) return;
    const int cb0 = h0 * a->ch / 8 * 8, cb1 = (h1 * a->ch + 7) / 8 * 8, nb = (cb1 - cb0) / 8;
    v8 mx[nb], sum[nb];
    channel_maxima(a, cb0, nb, mx, sum);
    for (int n0 = 0; n0 < a->N; n0 += TOKEN_BLOCK) {
        const int rows = a->N - n0 < TOKEN_BLOCK ? a->N - n0 : TOKEN_BLOCK;
        numerator_rows(a, n0, n0 + rows, cb0, nb, mx, sum, E, V);
        context_products(a, E, a->cs, V, a->cs, NULL, a->ctx, h0, h1, rows, n0 > 0);
    }
    float inv[8 * nb];
    for (int b = 0; b < nb; ++b) st(inv + 8 * b, splat(a->scale) / sum[b]);  /* each sum >= exp(0) */
    for (int h = h0; h < h1; ++h)
        for (int i = 0; i < a->ch; ++i) {
            float *row = a->ctx + ((long)h * a->ch + i) * a->chp;
            const float r = inv[h * a->ch + i - cb0];
            for (int j = 0; j < a->chp; j += 8) st(row + j, ld(row + j) * r);
        }
}

/* floats of `blocked_contexts`' E and V blocks, and of one image's contexts (with the 16 floats a last tile of
   `tile_products` may read past them) */
static inline size_t block_scratch(int C) { return (size_t)2 * (TOKEN_BLOCK + 1) * scratch_row(C); }
static inline size_t context_scratch(int C, int heads)
{
    return ((size_t)heads * (C / heads) * ((C / heads + 7) / 8 * 8) + 16 + 15) / 16 * 16;
}

static attention_t forward_setup(const float *qkv, long ts, int N, int C, int heads, float scale, float *out,
                                 long ots, float *ctx)
{
    attention_t a = {qkv, ts, ots, N, C, heads, C / heads, (C / heads + 7) / 8 * 8, 0, (int)scratch_row(C), scale,
                     out, NULL, NULL, ctx, NULL};
    a.nv = a.chp / 8;
    return a;
}

/* n zeroed floats on a 64-byte boundary (NULL without memory; *raw is what to free) */
static float *alloc_zeroed_lines(size_t n, void **raw)
{
    float *p = alloc_lines(n, raw);
    if (p) memset(p, 0, sizeof(float) * n);
    return p;
}

/* CRPE's depthwise convolution, fused into the attention's output pass (`factor_attention`): taps, bias and block
   windows as `dwconv_tokens` takes them, over the H x W grid of tokens 1..N-1; w NULL: none */
typedef struct {
    const float *w, *bias;
    const int *kb;
    int K, H, W;
} crpe_t;

/* The output rows of tokens [n0, n1), or with a CRPE, of the grid rows [n0, n1) (n0 -1: the class token): each
   row's products, then q * DWConv(v) added to it while its q and output are in the cache (the same sum as
   `dwconv_tokens` with add = dst = out, mul = q, src = v) */
static void output_rows(const attention_t *a, const crpe_t *c, int n0, int n1)
{
    if (!c->w) {
        output_pass(a, n0, n1);
        return;
    }
    for (int y = n0; y < n1; ++y) {
        if (y < 0) {
            output_pass(a, 0, 1);
            continue;
        }
        const long n = 1 + (long)y * c->W;
        output_pass(a, (int)n, (int)n + c->W);
        const float *tokens = a->qkv + a->ts;  /* token 1, the grid's first */
        dwconv_pixels(tokens + 2 * a->C, a->ts, c->w, c->bias, c->kb, c->K, a->C, c->H, c->W, y, 0, c->W, tokens,
                      a->ts, a->out + a->ots, a->ots, a->out + a->ots, a->ots);
    }
}

/* The factorized attention of a batch: with at least as many images as threads, images split among the threads
   (one image per thread at a time); with fewer, each image's contexts split among them by heads, then its
   tokens (or grid rows). cw NULL: the attention alone; else out gets CRPE's term too, Q_img * DWConv(V_img) over
   the H x W grid of tokens 1..N-1 (N = 1 + H W) with taps cw, bias cb and block windows kb of the largest window
   K, as `dwconv_tokens` takes them. Returns 0, or -1 when scratch memory could not be had (out is then
   incomplete). */
int factor_attention(const float *qkv, long bs, long ts, int B, int N, int C, int heads, float scale,
                     float *out, long obs, long ots, const float *cw, const float *cb, const int *kb, int K, int H,
                     int W, int threads)
{
    const size_t blocks = block_scratch(C), contexts = context_scratch(C, heads);
    const crpe_t crpe = {cw, cb, kb, K, H, W};
    const int first = cw ? -1 : 0, last = cw ? H : N;  /* output_rows' range: tokens, or grid rows */
    int failed = 0;
    if (B >= threads) {
        #pragma omp parallel num_threads(threads) reduction(|:failed)
        {
            void *raw;
            float *scratch = alloc_zeroed_lines(blocks + contexts, &raw);
            failed = scratch == NULL;
            #pragma omp for schedule(static)
            for (long b = 0; b < B; ++b) {
                if (!scratch) continue;
                const attention_t a = forward_setup(qkv + b * bs, ts, N, C, heads, scale, out + b * obs, ots,
                                                    scratch + blocks);
                blocked_contexts(&a, 0, heads, scratch, scratch + blocks / 2);
                output_rows(&a, &crpe, first, last);
            }
            free(raw);
        }
        return failed ? -1 : 0;
    }
    void *raw;
    float *ctx = alloc_zeroed_lines(contexts, &raw);
    if (!ctx) return -1;
    const int step = cw ? 1 : 64;
    #pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        void *own;
        float *scratch = alloc_zeroed_lines(blocks, &own);
        failed = scratch == NULL;
        for (long b = 0; b < B; ++b) {
            const attention_t a = forward_setup(qkv + b * bs, ts, N, C, heads, scale, out + b * obs, ots, ctx);
            #pragma omp for schedule(static)
            for (int t = 0; t < threads; ++t)
                if (scratch) blocked_contexts(&a, t * heads / threads, (t + 1) * heads / threads, scratch,
                                              scratch + blocks / 2);
            #pragma omp for schedule(static)
            for (int n = first; n < last; n += step) output_rows(&a, &crpe, n, n + step < last ? n + step : last);
        }
        free(own);
    }
    free(raw);
    return failed ? -1 : 0;
}

/* Bilinear taps of output index o on an axis resized from n_in to n_out samples (align_corners=False, PyTorch's
   rule: source position (o + 0.5) * n_in / n_out - 0.5, clamped at 0; the second tap clamped to the last sample). */
typedef struct { int i0, i1; float l0, l1; } taps_t;

static inline taps_t taps(int o, int n_in, int n_out)
{
    const float scale = (float)n_in / (float)n_out;
    float s = scale * ((float)o + 0.5f) - 0.5f;
    if (s < 0.0f) s = 0.0f;
    int i = (int)s;
    if (i > n_in - 1) i = n_in - 1;
    taps_t t = {i, i + (i < n_in - 1), 0.0f, s - (float)i};
    if (t.l1 > 1.0f) t.l1 = 1.0f;
    t.l0 = 1.0f - t.l1;
    return t;
}

typedef struct { const float *p; long bs, ts; int H, W; } tokens_t;

/* one source's bilinear sample at output pixel (y, x) of an H x W grid, channels c..c+7 of image b's tokens */
typedef struct { const float *p00, *p01, *p10, *p11; float w00, w01, w10, w11; } sample_t;

static inline sample_t sample_at(const tokens_t *s, long b, taps_t ty, int x, int W)
{
    const taps_t tx = taps(x, s->W, W);
    const float *img = s->p + b * s->bs + s->ts;  /* image tokens start after the class token */
    sample_t r = {img + ((long)ty.i0 * s->W + tx.i0) * s->ts, img + ((long)ty.i0 * s->W + tx.i1) * s->ts,
                  img + ((long)ty.i1 * s->W + tx.i0) * s->ts, img + ((long)ty.i1 * s->W + tx.i1) * s->ts,
                  ty.l0 * tx.l0, ty.l0 * tx.l1, ty.l1 * tx.l0, ty.l1 * tx.l1};
    return r;
}

/* The co-scale mix of a parallel block, for one scale, in one pass over CoaT's (B, 1 + H*W, C) token layout:

   dst = x + ((a + resize(s1)) + resize(s2))

   where resize is PyTorch's bilinear interpolation (align_corners=False) of a source's H_i x W_i image tokens to
   this scale's H x W grid, and carries the source's class token over unchanged (row 0). The sums run in this order,
   the reference path's. Channels are contiguous; batch and token strides count floats; dst must not overlap the
   inputs. Rows (b, class token or grid row y) are split among the threads. */
void mix_tokens(const float *x, long x_bs, long x_ts, const float *a, long a_bs, long a_ts,
                const float *s1p, long s1_bs, long s1_ts, int H1, int W1,
                const float *s2p, long s2_bs, long s2_ts, int H2, int W2,
                float *dst, long d_bs, long d_ts, int B, int H, int W, int C, int threads)
{
    const tokens_t s1 = {s1p, s1_bs, s1_ts, H1, W1}, s2 = {s2p, s2_bs, s2_ts, H2, W2};
    const int cv = C / 8 * 8;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < (long)B * (H + 1); ++row) {
        const long b = row / (H + 1);
        const int y = (int)(row % (H + 1)) - 1;  /* -1: the class token */
        if (y < 0) {
            const float *xp = x + b * x_bs, *ap = a + b * a_bs, *p1 = s1p + b * s1_bs, *p2 = s2p + b * s2_bs;
            float *d = dst + b * d_bs;
            for (int c = 0; c < C; ++c) d[c] = xp[c] + ((ap[c] + p1[c]) + p2[c]);
            continue;
        }
        const taps_t t1 = taps(y, H1, H), t2 = taps(y, H2, H);
        for (int px = 0; px < W; ++px) {
            const long n = 1 + (long)y * W + px;
            const float *xp = x + b * x_bs + n * x_ts, *ap = a + b * a_bs + n * a_ts;
            float *d = dst + b * d_bs + n * d_ts;
            const sample_t u = sample_at(&s1, b, t1, px, W), v = sample_at(&s2, b, t2, px, W);
            int c = 0;
            for (; c < cv; c += 8) {
                const v8 r1 = ld(u.p00 + c) * u.w00 + ld(u.p01 + c) * u.w01 + ld(u.p10 + c) * u.w10
                              + ld(u.p11 + c) * u.w11;
                const v8 r2 = ld(v.p00 + c) * v.w00 + ld(v.p01 + c) * v.w01 + ld(v.p10 + c) * v.w10
                              + ld(v.p11 + c) * v.w11;
                st(d + c, ld(xp + c) + ((ld(ap + c) + r1) + r2));
            }
            for (; c < C; ++c) {
                const float r1 = u.p00[c] * u.w00 + u.p01[c] * u.w01 + u.p10[c] * u.w10 + u.p11[c] * u.w11;
                const float r2 = v.p00[c] * v.w00 + v.p01[c] * v.w01 + v.p10[c] * v.w10 + v.p11[c] * v.w11;
                d[c] = xp[c] + ((ap[c] + r1) + r2);
            }
        }
    }
}

/* The factorized attention's backward (CPU training). With ctx = scale * E^T V per head (E = softmax over the
   tokens of K) and out = Q ctx, for the output gradient g:
     dctx = Q^T g,  dQ = g ctx^T,  dV = scale * E dctx,  G = V dctx^T,
     dK = E * (scale * G - sum over tokens of (E * scale * G))     (the softmax's backward, per channel),
   in terms of the forward's state in `a` (unnormalized exp(k - max) in E, inv = scale / sum):
     dV = (E inv) dctx,  dK = inv E (G - S inv / scale),  S = sum over tokens of E G.
   dq, dk, dv go side by side into the qkv gradient d (rows dts floats apart). Each step works on a range of
   tokens, heads or channels, so that one image's backward can be split among threads. */
typedef struct {
    const float *g;
    long gts, dts;
    float *d, *gp, *dctx, *ctxT, *dctxT, *dctxI, *S;  /* gp: g, then G, with padded rows (a->cs floats apart) */
} attention_grad_t;

static void grad_copy_pass(const attention_t *a, const attention_grad_t *b, int n0, int n1)  /* tokens */
{
    for (int n = n0; n < n1; ++n) {
        float *r = b->gp + (long)n * a->cs;
        memcpy(r, b->g + n * b->gts, sizeof(float) * a->C);
        memset(r + a->C, 0, sizeof(float) * 8);
    }
}

static void grad_matrix_pass(const attention_t *a, const attention_grad_t *b, int h0, int h1)  /* heads */
{
    const int ch = a->ch, chp = a->chp;
    context_products(a, a->qkv, a->ts, b->gp, a->cs, NULL, b->dctx, h0, h1, a->N, 0);  /* dctx = Q^T g */
    for (int h = h0; h < h1; ++h) {
        const long m = (long)h * ch * chp;
        const float *cx = a->ctx + m, *dc = b->dctx + m;
        float *ct = b->ctxT + m, *dt = b->dctxT + m, *di = b->dctxI + m;
        memset(ct, 0, sizeof(float) * ch * chp);
        memset(dt, 0, sizeof(float) * ch * chp);
        memset(di, 0, sizeof(float) * ch * chp);
        for (int i = 0; i < ch; ++i)
            for (int j = 0; j < ch; ++j) {
                ct[(long)j * chp + i] = cx[(long)i * chp + j];
                dt[(long)j * chp + i] = dc[(long)i * chp + j];
                di[(long)i * chp + j] = a->inv[h * ch + i] * dc[(long)i * chp + j];
            }
    }
}

static void grad_token_pass(const attention_t *a, const attention_grad_t *b, int n0, int n1)  /* tokens */
{
    tile_products(a, b->g, b->gts, b->ctxT, b->d, b->dts, n0, n1);                 /* dq = g ctx^T */
    tile_products(a, a->V, a->cs, b->dctxT, b->gp, a->cs, n0, n1);                 /* G = V dctx^T (over g's copy) */
    tile_products(a, a->E, a->cs, b->dctxI, b->d + 2 * a->C, b->dts, n0, n1);      /* dv = (E inv) dctx */
}

static void grad_key_pass(const attention_t *a, const attention_grad_t *b, int c0, int c1)  /* channels, by 8 */
{
    const long cs = a->cs;
    for (int c = c0; c < c1; c += 8) {
        v8 sum = splat(0.0f);
        for (int n = 0; n < a->N; ++n) sum += ld(a->E + n * cs + c) * ld(b->gp + n * cs + c);
        const v8 inv = ld(a->inv + c), shift = sum * inv / splat(a->scale);
        for (int n = 0; n < a->N; ++n)
            st(b->d + n * b->dts + a->C + c, inv * ld(a->E + n * cs + c) * (ld(b->gp + n * cs + c) - shift));
    }
}

/* scratch floats of one image's backward beyond the forward's: g's padded copy (then G), dctx and its two
   transposed or scaled forms */
static size_t attention_grad_scratch(int N, int C, int heads)
{
    const int ch = C / heads, chp = (ch + 7) / 8 * 8;
    return (size_t)N * scratch_row(C) + (size_t)4 * heads * ch * chp;
}

static attention_grad_t attention_grad_setup(const attention_t *a, const float *g, long gts, float *d, long dts,
                                             float *scratch)
{
    const size_t m = (size_t)a->heads * a->ch * a->chp;
    attention_grad_t b = {g, gts, dts, d, scratch, NULL, NULL, NULL, NULL, NULL};
    b.dctx = b.gp + (size_t)a->N * a->cs;
    b.ctxT = b.dctx + m;
    b.dctxT = b.ctxT + m;
    b.dctxI = b.dctxT + m;
    return b;
}

/* The factorized attention's backward of a batch: dqkv (B, N, 3C; images dbs floats apart) from the projection
   qkv the forward read and the output gradient g (B, N, C), the forward's softmax and contexts recomputed per
   image. With at least as many images as threads, images split among the threads; with fewer, each image's
   passes split among them. Returns 0, or -1 when scratch memory could not be had (dqkv is then incomplete). */
int factor_attention_backward(const float *qkv, long bs, long ts, int B, int N, int C, int heads, float scale,
                              const float *g, long gbs, long gts, float *d, long dbs, long dts, int threads)
{
    const size_t fwd = attention_scratch(N, C, heads), total = fwd + attention_grad_scratch(N, C, heads);
    int failed = 0;
    if (B >= threads) {
        #pragma omp parallel num_threads(threads) reduction(|:failed)
        {
            void *raw;
            float *scratch = alloc_lines(total, &raw);
            failed = scratch == NULL;
            #pragma omp for schedule(static)
            for (long i = 0; i < B; ++i) {
                if (!scratch) continue;
                const attention_t a = attention_setup(qkv + i * bs, ts, N, C, heads, scale, NULL, 0, scratch);
                const attention_grad_t b = attention_grad_setup(&a, g + i * gbs, gts, d + i * dbs, dts,
                                                                scratch + fwd);
                softmax_pass(&a, 0, C);
                context_pass(&a, 0, heads);
                grad_copy_pass(&a, &b, 0, N);
                grad_matrix_pass(&a, &b, 0, heads);
                grad_token_pass(&a, &b, 0, N);
                grad_key_pass(&a, &b, 0, C);
            }
            free(raw);
        }
        return failed ? -1 : 0;
    }
    void *raw;
    float *scratch = alloc_lines(total, &raw);
    if (!scratch) return -1;
    for (long i = 0; i < B; ++i) {
        const attention_t a = attention_setup(qkv + i * bs, ts, N, C, heads, scale, NULL, 0, scratch);
        const attention_grad_t b = attention_grad_setup(&a, g + i * gbs, gts, d + i * dbs, dts, scratch + fwd);
        #pragma omp parallel num_threads(threads)
        {
            shared_context_passes(&a);
            #pragma omp for schedule(static)
            for (int n = 0; n < N; n += 64) grad_copy_pass(&a, &b, n, n + 64 < N ? n + 64 : N);
            #pragma omp for schedule(dynamic)
            for (int h = 0; h < heads; ++h) grad_matrix_pass(&a, &b, h, h + 1);
            #pragma omp for schedule(static)
            for (int n = 0; n < N; n += 64) grad_token_pass(&a, &b, n, n + 64 < N ? n + 64 : N);
            #pragma omp for schedule(static)
            for (int c = 0; c < C; c += 8) grad_key_pass(&a, &b, c, c + 8);
        }
    }
    free(raw);
    return 0;
}

/* a * b + c, one rounding where the CPU has FMA (GCC does not contract a * b + c under -std=c99) */
static inline v8 fmadd(v8 a, v8 b, v8 c)
{
#if defined(__AVX2__) && defined(__FMA__)
    return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

/* min(hi, max(-hi, x)); NaN stays NaN */
static inline v8 clamp_sym(v8 x, v8 hi)
{
#ifdef __AVX2__
    return (v8)_mm256_min_ps((__m256)hi, _mm256_max_ps((__m256)-hi, (__m256)x));  /* NaN: the second operand */
#else
    x = select(x > hi, hi, x);
    return select(x < -hi, -hi, x);
#endif
}

/* erf(x / sqrt 2), the erf of the exact GELU x/2 (1 + erf(x / sqrt 2)), to within 1e-6 of float32's: erf z as
   z P(z^2) / Q(z^2) on |z| < 3.8325 (the rational approximation of Eigen's and XLA's float erf, a bound beyond which
   erf is +-1 in float32) and exactly +-1 beyond it. NaN stays NaN. */
static inline v8 gelu_erf8(v8 x)
{
    const v8 hi = splat(3.832506856900711f);
    const v8 z = clamp_sym(x * 0.70710678118654752f, hi);
    const v8 z2 = z * z;
    v8 p = fmadd(z2, splat(-2.72614225801306e-10f), splat(2.77068142495902e-08f));
    p = fmadd(p, z2, splat(-2.10102402082508e-06f));
    p = fmadd(p, z2, splat(-5.69250639462346e-05f));
    p = fmadd(p, z2, splat(-7.34990630326855e-04f));
    p = fmadd(p, z2, splat(-2.95459980854025e-03f));
    p = fmadd(p, z2, splat(-1.60960333262415e-02f));
    v8 q = fmadd(z2, splat(-1.45660718464996e-05f), splat(-2.13374055278905e-04f));
    q = fmadd(q, z2, splat(-1.68282697438203e-03f));
    q = fmadd(q, z2, splat(-7.37332916720468e-03f));
    q = fmadd(q, z2, splat(-1.42647390514189e-02f));
    return select(z == hi, splat(1.0f), select(z == -hi, splat(-1.0f), z * p / q));
}

/* GELU(x) from e = gelu_erf8(x); -inf gives NaN and +inf gives +inf, as PyTorch's */
static inline v8 gelu_from(v8 x, v8 e)
{
    const v8 half = x * 0.5f;
    return fmadd(half, e, half);
}

/* dst = GELU(src) over `rows` rows of n floats, src_rs and dst_rs floats apart; dst may be src (in place). Rows
   are split among the threads. */
void gelu_rows(const float *src, long src_rs, float *dst, long dst_rs, long rows, long n, int threads)
{
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < rows; ++i) {
        const float *s = src + i * src_rs;
        float *d = dst + i * dst_rs;
        long j = 0;
        for (; j + 8 <= n; j += 8)
        {
            const v8 x = ld(s + j);
            st(d + j, gelu_from(x, gelu_erf8(x)));
        }
        if (j < n) {  /* the last n % 8 values through a zero-padded vector */
            float tail[8] = {0};
            memcpy(tail, s + j, (size_t)(n - j) * sizeof(float));
            const v8 x = ld(tail);
            st_part(d + j, gelu_from(x, gelu_erf8(x)), (int)(n - j));
        }
    }
}

/* one vector of the GELU backward: g * GELU'(x), GELU'(x) = Phi(x) + x phi(x) with Phi(x) = (1 + e) / 2 and
   phi(x) = exp(-x^2 / 2) / sqrt(2 pi); the GELU itself to *act. +-inf and NaN give NaN, as PyTorch's. */
static inline v8 gelu_grad8(v8 x, v8 g, v8 *act)
{
    const v8 e = gelu_erf8(x);
    *act = gelu_from(x, e);
    const v8 phi = exp8(x * x * -0.5f) * 0.39894228040143268f;
    const v8 slope = fmadd(x, phi, fmadd(e, splat(0.5f), splat(0.5f))) + (x - x);  /* x - x: NaN at +-inf */
    return g * slope;
}

/* Backward of GELU over `rows` rows of n floats: g <- g * GELU'(h) in place and, where act is not NULL,
   act <- GELU(h) from the same erf (what fc2's weight gradient multiplies). Row strides h_rs, g_rs, act_rs in
   floats; rows are split among the threads. */
void gelu_backward_rows(const float *h, long h_rs, float *g, long g_rs, float *act, long act_rs, long rows, long n,
                        int threads)
{
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < rows; ++i) {
        const float *hr = h + i * h_rs;
        float *gr = g + i * g_rs, *ar = act ? act + i * act_rs : NULL;
        long j = 0;
        v8 a;
        for (; j + 8 <= n; j += 8) {
            st(gr + j, gelu_grad8(ld(hr + j), ld(gr + j), &a));
            if (ar)
                st(ar + j, a);
        }
        if (j < n) {  /* the last n % 8 values through zero-padded vectors */
            float th[8] = {0}, tg[8] = {0};
            memcpy(th, hr + j, (size_t)(n - j) * sizeof(float));
            memcpy(tg, gr + j, (size_t)(n - j) * sizeof(float));
            st_part(gr + j, gelu_grad8(ld(th), ld(tg), &a), (int)(n - j));
            if (ar)
                st_part(ar + j, a, (int)(n - j));
        }
    }
}
