/* compress's own CPU kernels (AVX-512 BW + BF16), loaded with ctypes by compress/kernels/native.py.
 *
 * 1. W4A16 GEMV/GEMM for decode: y = x @ W^T (+ bias), x bf16 (M, K), W 4-bit codes with one
 *    float32 scale per (row, group) and an optional float32 zero term per (row, group):
 *        W[n, k] = (q[n, k] - 8) * s[n, g] + zt[n, g]        g = k / gs
 *    so  y[m, n] = sum_g s[n, g] * (sum_{k in g} (q - 8) x[m, k]) + sum_g zt[n, g] * xsum[m, g].
 *    The inner sums run on VDPBF16PS: the codes are decoded to bf16 (q - 8) (exact small integers)
 *    by one VPERMW table lookup per 32 codes, so every product is exact and summed in float32.
 *
 *    Code layout (per output row, per group, K natural order): a group's codes come in chunks of
 *    64 columns, 32 bytes each, byte j holding column j (low nibble) and column j + 32 (high);
 *    a group whose width is an odd multiple of 32 ends with a half chunk of 16 bytes, byte j
 *    holding column j (low) and j + 16 (high). Decoding a chunk is one zero-extension to 16-bit
 *    lanes, one shift and two table lookups (VPERMW reads the low 5 bits of each lane, so the
 *    32-entry table repeats its 16 values and the low nibble needs no mask).
 *
 *    Threads split the output rows; a row's codes (K/2 bytes) stay in L1 while up to 4 token
 *    rows at a time read them, so M > 4 re-reads the codes from L1, not from memory. The codes
 *    are prefetched PREFETCH bytes ahead.
 *
 * 2. The dequantized weight (N, K) in bf16, rounded to nearest even from the exact float32
 *    (q - 8) * s + zt: the prefill path's dense GEMM operand.
 *
 * 3. Per-token int8 quantization of bf16 activations (W8A8), in one read of each row:
 *        xs = max|x| / 127;  q = clamp(round_half_even(x / (xs > 0 ? xs : 1)), -127, 127)
 *    bit for bit what compress.kernels.reference.quantize_per_token computes in float32.
 *
 * Every entry point returns 0, or -1 on arguments it does not take.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m512i code_table(void) {
    uint16_t t[32];
    for (int i = 0; i < 32; i++) {
        float f = (float)((i & 15) - 8);
        uint32_t u;
        memcpy(&u, &f, 4);
        t[i] = (uint16_t)(u >> 16); /* small integers are exact in bf16 */
    }
    return _mm512_loadu_si512(t);
}

static inline uint16_t to_bf16(float f) { /* round to nearest even (NaN stays NaN) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Software prefetch distance in bytes of codes: the hardware prefetchers alone kept one decode
 * stream at 6-9 GB/s from memory on the project's Xeon; 2 KB ahead (a few rows) reaches the
 * bf16 GEMV's 20 GB/s (measured with 2 threads: 0 B 9.3, 512 B 15.5, 1 KB 18.0, 2 KB 20.0, 4 KB 19.9 GB/s).
 * A prefetch past the end of the codes never faults. */
#define PREFETCH 2048

#define DP(acc, w, xp) (acc) = _mm512_dpbf16_ps((acc), (__m512bh)(w), (__m512bh)_mm512_loadu_si512(xp))

/* One output row n against MB (1..4) token rows: out[m] = sum_g s_g * dot_g + sum_g zt_g * xsum[m][g]. */
static inline __attribute__((always_inline)) void row_dot(
    const int MB, const uint16_t *const *xr, const float *xsum, int G, const uint8_t *w,
    const float *s, const float *zt, int gs, float *out, __m512i tab)
{
    __m512 tot[4];
    float corr[4] = {0, 0, 0, 0};
    for (int m = 0; m < MB; m++) tot[m] = _mm512_setzero_ps();
    const uint8_t *wp = w;  /* this group's codes */
    const uint16_t *xp[4];   /* this group's activations, per token row */
    for (int m = 0; m < MB; m++) xp[m] = xr[m];
    for (int g = 0; g < G; g++) {
        __m512 a0[4], a1[4], a2[4], a3[4];
        for (int m = 0; m < MB; m++) a0[m] = a1[m] = a2[m] = a3[m] = _mm512_setzero_ps();
        size_t j = 0; /* bytes into the group's codes; column 2 j */
        const size_t half = (size_t)gs / 2;
        for (; j + 64 <= half; j += 64) { /* two chunks: four independent accumulator chains */
            _mm_prefetch((const char *)(wp + j + PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char *)(wp + j + PREFETCH + 64), _MM_HINT_T0);
            __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wp + j)));
            __m512i c = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wp + j + 32)));
            __m512i w0 = _mm512_permutexvar_epi16(b, tab), w1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), tab);
            __m512i w2 = _mm512_permutexvar_epi16(c, tab), w3 = _mm512_permutexvar_epi16(_mm512_srli_epi16(c, 4), tab);
            for (int m = 0; m < MB; m++) {
                const uint16_t *xk = xp[m] + 2 * j;
                DP(a0[m], w0, xk);
                DP(a1[m], w1, xk + 32);
                DP(a2[m], w2, xk + 64);
                DP(a3[m], w3, xk + 96);
            }
        }
        if (j + 32 <= half) {
            _mm_prefetch((const char *)(wp + j + PREFETCH), _MM_HINT_T0);
            __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wp + j)));
            __m512i w0 = _mm512_permutexvar_epi16(b, tab), w1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), tab);
            for (int m = 0; m < MB; m++) {
                DP(a0[m], w0, xp[m] + 2 * j);
                DP(a1[m], w1, xp[m] + 2 * j + 32);
            }
            j += 32;
        }
        if (j < half) { /* the half chunk: 32 columns in 16 bytes */
            __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wp + j)));
            __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1);
            __m512i w0 = _mm512_permutexvar_epi16(idx, tab);
            for (int m = 0; m < MB; m++) DP(a2[m], w0, xp[m] + 2 * j);
        }
        wp += half;
        for (int m = 0; m < MB; m++) xp[m] += gs;
        const __m512 sv = _mm512_set1_ps(s[g]);
        for (int m = 0; m < MB; m++)
            tot[m] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(a0[m], a1[m]), _mm512_add_ps(a2[m], a3[m])), sv, tot[m]);
        if (zt)
            for (int m = 0; m < MB; m++) corr[m] += zt[g] * xsum[m * G + g];
    }
    for (int m = 0; m < MB; m++) out[m] = _mm512_reduce_add_ps(tot[m]) + corr[m];
}

static void row_block(int MB, const uint16_t *const *xr, const float *xsum, int G, const uint8_t *w,
                      const float *s, const float *zt, int gs, float *out, __m512i tab)
{
    switch (MB) { /* constant MB: the compiler unrolls the token loop and keeps accumulators in registers */
    case 1: row_dot(1, xr, xsum, G, w, s, zt, gs, out, tab); break;
    case 2: row_dot(2, xr, xsum, G, w, s, zt, gs, out, tab); break;
    case 3: row_dot(3, xr, xsum, G, w, s, zt, gs, out, tab); break;
    default: row_dot(4, xr, xsum, G, w, s, zt, gs, out, tab); break;
    }
}

/* x bf16 (M, ldx), codes uint8 (N, K/2), scales/zt float32 (N, G) (zt may be NULL), bias float32
 * (N) or NULL, y bf16 (M, ldy); xsum float32 scratch (M, G), filled here when zt is given. */
int compress_int4_linear(const uint16_t *x, const uint8_t *codes, const float *scales, const float *zt,
                         const float *bias, uint16_t *y, float *xsum, int M, int N, int K, int gs,
                         int ldx, int ldy, int nthreads)
{
    if (M < 0 || N < 0 || K <= 0 || gs <= 0 || gs % 32 || K % gs || nthreads < 1) return -1;
    const int G = K / gs;
    if (zt) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int m = 0; m < M; m++)
            for (int g = 0; g < G; g++) {
                float acc = 0.f;
                for (int k = g * gs; k < (g + 1) * gs; k++) acc += from_bf16(x[(int64_t)m * ldx + k]);
                xsum[(int64_t)m * G + g] = acc;
            }
    }
#pragma omp parallel num_threads(nthreads)
    {
        const __m512i tab = code_table();
        /* Each thread alternates between two distant rows (n and n + H): two memory streams
         * at once read 15-30% faster than one (16.6 against 19.1-19.9 GB/s, 2 threads). */
        const int H = (N + 1) / 2;
#pragma omp for schedule(static)
        for (int i = 0; i < 2 * H; i++) {
            const int n = i / 2 + (i % 2) * H;
            if (n >= N) continue;
            const uint8_t *w = codes + (int64_t)n * (K / 2);
            const float *s = scales + (int64_t)n * G, *z = zt ? zt + (int64_t)n * G : NULL;
            for (int m0 = 0; m0 < M; m0 += 4) {
                const int MB = M - m0 < 4 ? M - m0 : 4;
                const uint16_t *xr[4];
                float out[4];
                for (int m = 0; m < MB; m++) xr[m] = x + (int64_t)(m0 + m) * ldx;
                row_block(MB, xr, zt ? xsum + (int64_t)m0 * G : NULL, G, w, s, z, gs, out, tab);
                for (int m = 0; m < MB; m++)
                    y[(int64_t)(m0 + m) * ldy + n] = to_bf16(out[m] + (bias ? bias[n] : 0.f));
            }
        }
    }
    return 0;
}

/* W (N, K) bf16 from the codes: (q - 8) * s + zt in float32 (exact product), rounded to even. */
int compress_int4_dequant(const uint8_t *codes, const float *scales, const float *zt, uint16_t *out,
                          int N, int K, int gs, int nthreads)
{
    if (N < 0 || K <= 0 || gs <= 0 || gs % 32 || K % gs || nthreads < 1) return -1;
    const int G = K / gs;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *w = codes + (int64_t)n * (K / 2);
        uint16_t *o = out + (int64_t)n * K;
        int k = 0;
        for (int g = 0; g < G; g++) {
            const float s = scales[(int64_t)n * G + g], z = zt ? zt[(int64_t)n * G + g] : 0.f;
            const int kend = k + gs;
            for (; k < kend;) {
                const int half = kend - k < 64 ? 16 : 32; /* bytes in this chunk */
                for (int j = 0; j < half; j++) {
                    const uint8_t b = w[k / 2 + j];
                    o[k + j] = to_bf16((float)((b & 15) - 8) * s + z);
                    o[k + half + j] = to_bf16((float)((b >> 4) - 8) * s + z);
                }
                k += 2 * half;
            }
        }
    }
    return 0;
}

/* x bf16 (T, ldx) -> q int8 (T, K) and scale float32 (T). */
int compress_quantize_rows_bf16(const uint16_t *x, int8_t *q, float *scale, int T, int K, int ldx, int nthreads)
{
    if (T < 0 || K <= 0 || nthreads < 1) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int t = 0; t < T; t++) {
        const uint16_t *r = x + (int64_t)t * ldx;
        int8_t *o = q + (int64_t)t * K;
        __m512 mx = _mm512_setzero_ps();
        int k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r + k))), 16));
            mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
        }
        float amax = _mm512_reduce_max_ps(mx);
        for (; k < K; k++) amax = fmaxf(amax, fabsf(from_bf16(r[k])));
        const float xs = amax / 127.0f, safe = xs > 0.f ? xs : 1.0f;
        scale[t] = xs;
        const __m512 sv = _mm512_set1_ps(safe);
        const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
        for (k = 0; k + 16 <= K; k += 16) {
            __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r + k))), 16));
            __m512i i = _mm512_cvt_roundps_epi32(_mm512_div_ps(v, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm_storeu_si128((__m128i *)(o + k), _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(i, lo), hi)));
        }
        for (; k < K; k++) {
            float v = nearbyintf(from_bf16(r[k]) / safe);
            o[k] = (int8_t)(v > 127.f ? 127 : v < -127.f ? -127 : v);
        }
    }
    return 0;
}

/* W8A8's epilogue, in place: y[m, n] = bf16(y[m, n] * rs[m] (+ bias[n])), y bf16 (M, ld), rs
 * float32 (M) (the per-token activation scales), bias float32 (N) or NULL: one float32 product
 * (and sum), rounded once to nearest even, in one pass over y. */
int compress_scale_rows_bf16(uint16_t *y, const float *rs, const float *bias, int M, int N, int ld, int nthreads)
{
    if (M < 0 || N < 0 || ld < N || nthreads < 1) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int m = 0; m < M; m++) {
        uint16_t *r = y + (int64_t)m * ld;
        const __m512 sv = _mm512_set1_ps(rs[m]);
        int n = 0;
        for (; n + 16 <= N; n += 16) {
            __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r + n))), 16));
            v = bias ? _mm512_fmadd_ps(v, sv, _mm512_loadu_ps(bias + n)) : _mm512_mul_ps(v, sv);
            _mm256_storeu_si256((__m256i *)(r + n), (__m256i)_mm512_cvtneps_pbh(v));
        }
        for (; n < N; n++) r[n] = to_bf16(bias ? from_bf16(r[n]) * rs[m] + bias[n] : from_bf16(r[n]) * rs[m]);
    }
    return 0;
}

/* e^x for float32 lanes: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so r is exact to a
 * float's precision), e^r by its degree-7 Taylor-like minimax polynomial (Cephes' expf
 * coefficients, relative error ~1e-7), times 2^n by VSCALEFPS. x is clamped to [-87.3, 88.7]. */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 load_bf16_mask(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* A gated MLP's middle for W8A8, in one pass per token row: h = silu(g · rs) · (u · rs), float32,
 * from the gate and up GEMMs' bf16 outputs g, u (T, I; rows ldg, ldu apart) and the per-token
 * scales rs (T) of their int8 input; then h quantized per token like compress_quantize_rows_bf16:
 * scale[t] = max|h| / 127, q = round-half-even(h / scale) clamped to ±127. The row of h lives in a
 * per-thread float buffer of I floats (I * 4 bytes: in L2 for the widths served). */
int compress_silu_mul_quant_bf16(const uint16_t *g, const uint16_t *u, const float *rs, int8_t *q, float *scale,
                                 int T, int I, int ldg, int ldu, int nthreads)
{
    if (T < 0 || I <= 0 || ldg < I || ldu < I || nthreads < 1) return -1;
    int bad = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *h = (float *)aligned_alloc(64, ((size_t)I + 15) / 16 * 64); /* whole 16-lane chunks */
        if (!h) {
#pragma omp atomic write
            bad = 1;
        }
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            if (!h) continue;
            const uint16_t *gr = g + (int64_t)t * ldg, *ur = u + (int64_t)t * ldu;
            const float s = rs[t];
            const __m512 sv = _mm512_set1_ps(s), one = _mm512_set1_ps(1.0f);
            __m512 mx = _mm512_setzero_ps();
            for (int k = 0; k < I; k += 16) {
                const __mmask16 m = I - k >= 16 ? 0xFFFF : (__mmask16)((1u << (I - k)) - 1);
                const __m512 gv = _mm512_mul_ps(load_bf16_mask(gr + k, m), sv), uv = _mm512_mul_ps(load_bf16_mask(ur + k, m), sv);
                const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
                const __m512 v = _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), uv);
                _mm512_store_ps(h + k, v); /* lanes past I: 0 (masked loads), inside the padded buffer */
                mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
            }
            const float xs = _mm512_reduce_max_ps(mx) / 127.0f, safe = xs > 0.f ? xs : 1.0f;
            scale[t] = xs;
            int8_t *o = q + (int64_t)t * I;
            const __m512 dv = _mm512_set1_ps(safe);
            const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
            for (int k = 0; k < I; k += 16) {
                const __mmask16 m = I - k >= 16 ? 0xFFFF : (__mmask16)((1u << (I - k)) - 1);
                __m512i i = _mm512_cvt_roundps_epi32(_mm512_div_ps(_mm512_load_ps(h + k), dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                _mm512_mask_cvtepi32_storeu_epi8(o + k, m, _mm512_min_epi32(_mm512_max_epi32(i, lo), hi));
            }
        }
        free(h);
    }
    return bad ? -2 : 0;
}

/* Llama's RMSNorm on bf16 rows, as transformers computes it (LlamaRMSNorm and its copies):
 * r = 1 / sqrt(mean(x²) + eps) in float32, h = bf16(x · r), y = bf16(w · h): the same two
 * roundings, one read of x and one write of y per row (transformers: five passes through float32
 * copies). Only the order of the float32 sum of squares differs. x, y (T, K) rows ldx, ldy apart;
 * w (K) bf16. */
int compress_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int T, int K, int ldx, int ldy, float eps, int nthreads)
{
    if (T < 0 || K <= 0 || ldx < K || ldy < K || nthreads < 1) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int t = 0; t < T; t++) {
        const uint16_t *r = x + (int64_t)t * ldx;
        uint16_t *o = y + (int64_t)t * ldy;
        __m512 ss = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) {
            const __mmask16 m = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            const __m512 v = load_bf16_mask(r + k, m);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const float var = _mm512_reduce_add_ps(ss) / (float)K + eps;
        const float inv = 1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(var)));
        const __m512 iv = _mm512_set1_ps(inv);
        for (int k = 0; k < K; k += 16) {
            const __mmask16 m = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(load_bf16_mask(r + k, m), iv));
            const __m512 hv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            const __m256i out = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(hv, load_bf16_mask(w + k, m)));
            _mm256_mask_storeu_epi16(o + k, m, out);
        }
    }
    return 0;
}
