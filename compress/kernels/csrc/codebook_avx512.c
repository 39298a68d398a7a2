/* compress's CPU kernel for non-uniform codebook layers (SqueezeLLM: CodebookLinear), AVX-512 BW
 * and BF16, loaded with ctypes by compress/kernels/codebook_cpu.py:
 *
 *     y[m, n] = sum_k x[m, k] * T[n, c[n, k]]  (+ bias[n])       c: 2, 3 or 4-bit codes
 *
 * straight from the export's codes: each row one least-significant-bit-first bit stream (code k
 * at bits [k*bits, (k+1)*bits)), ceil(K/8)*bits bytes per row, zero codes padding the row to a
 * multiple of 8; and each row's table T (2^bits entries, bf16 or float32).
 *
 * Decoding. A row is read in chunks of 128 codes (16*bits bytes). A chunk becomes four vectors
 * of 32 16-bit lanes, each lane holding one code in its low bits (with other bits above it):
 *   4-bit: 64 bytes, zero-extended to 16-bit lanes (two halves of 32 bytes); the low nibble is
 *          lane & 15, the high nibble lane >> 4;
 *   2-bit: 32 bytes zero-extended; the 4 codes of a byte are lane >> 0, 2, 4, 6;
 *   3-bit: 48 bytes = 16 groups of 8 codes in 3 bytes; VPERMD + VPSHUFB put group g's 24 bits in
 *          dword g, and one shift per 16-bit half takes two codes of every group at once.
 * The entry is then one table lookup per 32 codes: VPERMW (bf16) reads the low 5 bits of a lane,
 * VPERMPS (float32) the low 4, so the row's table is repeated to fill 32 (16) entries and the bits
 * above a code need no mask. bf16 x: VDPBF16PS multiplies the looked-up bf16 weights by x, exact
 * products summed in float32. float32 x: the float32 entries times x on FMA.
 *
 * The lanes come out of the decoder in a fixed order of the chunk's codes (not k order): rather
 * than shuffle every row's weights back, the activations are reordered to match once per call
 * (compress_codebook_permute, x padded with zeros to whole chunks), since every row reads the
 * same x. compress_codebook_order gives the order; compress_codebook_dequant writes the looked-up
 * weight in it, so that permuted x @ W^T is the product (the prefill path's GEMM operand).
 *
 * Threads split the output rows (each alternating between two distant rows: two memory streams,
 * as in int4_avx512.c); one row's codes (K*bits/8 bytes) stay in L1 while blocks of up to 8
 * token rows read them. Accumulation is float32; the output is rounded once to x's dtype, the
 * bias (rounded to x's dtype, as the torch reference adds it) added before.
 * Zero x past K meets the padding codes' entry T[n, 0]: a non-finite T[n, 0] would poison it.
 *
 * Every entry point returns 0, or -1 on arguments it does not take.
 */
#include <stdint.h>
#ifdef COMPRESS_EMULATE_AVX512 /* tests on CPUs without AVX-512: SIMDe's portable intrinsics (libsimde-dev) */
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
/* the three that SIMDe 0.7 lacks, in plain C */
static inline __m512i load_bytes(uint64_t k, const void *p) {
    uint8_t b[64];
    for (int i = 0; i < 64; i++) b[i] = (k >> i) & 1 ? ((const uint8_t *)p)[i] : 0;
    return _mm512_loadu_si512(b);
}
static inline __m512i widen_bytes(__m256i a) {
    uint8_t b[32];
    uint16_t w[32];
    _mm256_storeu_si256((__m256i *)b, a);
    for (int i = 0; i < 32; i++) w[i] = b[i];
    return _mm512_loadu_si512(w);
}
static inline float sum_lanes(__m512 a) {
    float f[16], s = 0.f;
    _mm512_storeu_ps(f, a);
    for (int i = 0; i < 16; i++) s += f[i];
    return s;
}
#else
#include <immintrin.h>
static inline __m512i load_bytes(uint64_t k, const void *p) { return _mm512_maskz_loadu_epi8(k, p); } /* masked-off bytes never fault */
static inline __m512i widen_bytes(__m256i a) { return _mm512_cvtepu8_epi16(a); }
static inline float sum_lanes(__m512 a) { return _mm512_reduce_add_ps(a); }
#endif
#include <string.h>

#define CHUNK 128     /* codes per decoding step */
#define PREFETCH 1024 /* bytes of codes prefetched ahead (int4_avx512.c measured 1-2 KB as enough) */
#define MAXMB 8       /* token rows sharing one decoded chunk */

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

static inline float entry(const void *tables, int tab_f32, int64_t i) {
    return tab_f32 ? ((const float *)tables)[i] : from_bf16(((const uint16_t *)tables)[i]);
}

/* Row n's table repeated over 32 bf16 lanes (lane i: T[n, i mod E]), rounded to bf16 like the
 * reference's weight.to(bfloat16). */
static inline __m512i table_bf16(const void *tables, int tab_f32, int n, int E) {
    uint16_t t[32];
    for (int i = 0; i < 32; i++)
        t[i] = tab_f32 ? to_bf16(((const float *)tables)[(int64_t)n * E + (i & (E - 1))])
                       : ((const uint16_t *)tables)[(int64_t)n * E + (i & (E - 1))];
    return _mm512_loadu_si512(t);
}

/* Row n's table repeated over 16 float32 lanes (lane i: T[n, i mod E]). */
static inline __m512 table_f32(const void *tables, int tab_f32, int n, int E) {
    float t[16];
    for (int i = 0; i < 16; i++) t[i] = entry(tables, tab_f32, (int64_t)n * E + (i & (E - 1)));
    return _mm512_loadu_ps(t);
}

static inline uint64_t low_bytes(int nb) { return nb >= 64 ? ~0ull : (1ull << nb) - 1; }

/* The chunk at p (nb of its bytes in the row: the last chunk may be short, read masked) -> four
 * vectors of 32 16-bit lanes, one code in the low bits of each (module comment). */
static inline __attribute__((always_inline)) void decode(const int BITS, const uint8_t *p, int nb, __m512i ix[4]) {
    if (BITS == 4) {
        const __m512i b = nb >= 64 ? _mm512_loadu_si512(p) : load_bytes(low_bytes(nb), p);
        const __m512i t0 = widen_bytes(_mm512_castsi512_si256(b)), t1 = widen_bytes(_mm512_extracti64x4_epi64(b, 1));
        ix[0] = t0, ix[1] = _mm512_srli_epi16(t0, 4), ix[2] = t1, ix[3] = _mm512_srli_epi16(t1, 4);
    } else if (BITS == 2) {
        const __m256i b = nb >= 32 ? _mm256_loadu_si256((const __m256i *)p) : _mm512_castsi512_si256(load_bytes(low_bytes(nb), p));
        const __m512i t = widen_bytes(b);
        ix[0] = t, ix[1] = _mm512_srli_epi16(t, 2), ix[2] = _mm512_srli_epi16(t, 4), ix[3] = _mm512_srli_epi16(t, 6);
    } else { /* 3 bits: 128-bit lane L gets bytes 12L..12L+15, then dword 4L+e gets group 4L+e's bytes */
        const __m512i b = load_bytes(low_bytes(nb < 48 ? nb : 48), p);
        const __m512i spread = _mm512_setr_epi32(0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12);
        const __m512i groups = _mm512_set4_epi32((int)0x800b0a09, (int)0x80080706, (int)0x80050403, (int)0x80020100);
        const __m512i d = _mm512_shuffle_epi8(_mm512_permutexvar_epi32(spread, b), groups); /* dword g: codes 8g..8g+7 */
        const uint32_t odd = 0xAAAAAAAAu; /* lane 2g: code 8g + 2v (d >> 6v); lane 2g+1: code 8g + 2v + 1 (bit 6v+3 to 16) */
        ix[0] = _mm512_mask_blend_epi16(odd, d, _mm512_slli_epi32(d, 13));
        ix[1] = _mm512_mask_blend_epi16(odd, _mm512_srli_epi32(d, 6), _mm512_slli_epi32(d, 7));
        ix[2] = _mm512_mask_blend_epi16(odd, _mm512_srli_epi32(d, 12), _mm512_slli_epi32(d, 1));
        ix[3] = _mm512_mask_blend_epi16(odd, _mm512_srli_epi32(d, 18), _mm512_srli_epi32(d, 5));
    }
}

/* The code (0..127, within its chunk) in 16-bit lane i (0..31) of decoded vector v (0..3). */
static int lane_code(int bits, int v, int i) {
    if (bits == 4) return 64 * (v / 2) + 2 * i + v % 2;
    if (bits == 2) return 4 * i + v;
    return 8 * (i / 2) + 2 * v + i % 2;
}

/* Position p of a chunk in the decode order holds code order[p]. bf16: vector v's lanes in turn;
 * float32: each vector's VPUNPCKLWD half (lanes 0-3 of each 128-bit lane), then its VPUNPCKHWD half. */
static void chunk_order(int bits, int f32, int *order) {
    for (int p = 0; p < CHUNK; p++) {
        const int v = p / 32, r = p % 32;
        const int lane = f32 ? 8 * ((r % 16) / 4) + 4 * (r / 16) + r % 4 : r;
        order[p] = lane_code(bits, v, lane);
    }
}

int compress_codebook_order(int bits, int f32, int *order) {
    if (bits < 2 || bits > 4) return -1;
    chunk_order(bits, f32, order);
    return 0;
}

/* x (M, ldx) bf16 (f32 = 0) or float32 -> xp (M, Kp), Kp = K rounded up to a chunk, in the decode
 * order, zeros past K. */
int compress_codebook_permute(const void *x, void *xp, int M, int K, int ldx, int bits, int f32, int nthreads) {
    if (bits < 2 || bits > 4 || M < 0 || K <= 0 || ldx < K || nthreads < 1) return -1;
    int order[CHUNK];
    chunk_order(bits, f32, order);
    const int Kp = (K + CHUNK - 1) / CHUNK * CHUNK;
#pragma omp parallel for num_threads(nthreads) schedule(static) if ((int64_t)M * Kp > 65536)
    for (int m = 0; m < M; m++)
        for (int k0 = 0; k0 < Kp; k0 += CHUNK)
            for (int p = 0; p < CHUNK; p++) {
                const int k = k0 + order[p];
                const int64_t o = (int64_t)m * Kp + k0 + p, i = (int64_t)m * ldx + k;
                if (f32) ((float *)xp)[o] = k < K ? ((const float *)x)[i] : 0.f;
                else ((uint16_t *)xp)[o] = k < K ? ((const uint16_t *)x)[i] : 0;
            }
    return 0;
}

/* One output row (codes w, rowbytes of them, nch chunks) against MB token rows xr[m] of the
 * permuted x: out[m] = the float32 dot product. */
static inline __attribute__((always_inline)) void row_dot(const int BITS, const int F32, const int MB, const uint8_t *w,
                                                          int rowbytes, int nch, const void *const *xr, __m512i tw, __m512 tf,
                                                          float *out) {
    const int CB = 16 * BITS;
    const int NA = MB <= 2 ? 4 : MB <= 4 ? 2 : 1; /* accumulator chains per token row: 4-8 in all */
    __m512 acc[8]; /* acc[m * NA + a]: MB * NA <= 8 */
    #pragma GCC unroll 8
    for (int i = 0; i < MB * NA; i++) acc[i] = _mm512_setzero_ps();
    for (int c = 0; c < nch; c++) {
        _mm_prefetch((const char *)(w + c * CB + PREFETCH), _MM_HINT_T0);
        __m512i ix[4];
        decode(BITS, w + c * CB, rowbytes - c * CB, ix);
        if (F32) {
            __m512 lo[4], hi[4];
            #pragma GCC unroll 8
            for (int v = 0; v < 4; v++) {
                lo[v] = _mm512_permutexvar_ps(_mm512_unpacklo_epi16(ix[v], _mm512_setzero_si512()), tf);
                hi[v] = _mm512_permutexvar_ps(_mm512_unpackhi_epi16(ix[v], _mm512_setzero_si512()), tf);
            }
            #pragma GCC unroll 8
            for (int m = 0; m < MB; m++) {
                const float *xk = (const float *)xr[m] + (int64_t)c * CHUNK;
                #pragma GCC unroll 8
                for (int v = 0; v < 4; v++) {
                    const int a = m * NA + v % NA;
                    acc[a] = _mm512_fmadd_ps(lo[v], _mm512_loadu_ps(xk + 32 * v), acc[a]);
                    acc[a] = _mm512_fmadd_ps(hi[v], _mm512_loadu_ps(xk + 32 * v + 16), acc[a]);
                }
            }
        } else {
            __m512i wv[4];
            #pragma GCC unroll 8
            for (int v = 0; v < 4; v++) wv[v] = _mm512_permutexvar_epi16(ix[v], tw);
            #pragma GCC unroll 8
            for (int m = 0; m < MB; m++) {
                const uint16_t *xk = (const uint16_t *)xr[m] + (int64_t)c * CHUNK;
                #pragma GCC unroll 8
                for (int v = 0; v < 4; v++)
                    acc[m * NA + v % NA] = _mm512_dpbf16_ps(acc[m * NA + v % NA], (__m512bh)wv[v], (__m512bh)_mm512_loadu_si512(xk + 32 * v));
            }
        }
    }
    #pragma GCC unroll 8
    for (int m = 0; m < MB; m++) {
        __m512 s = acc[m * NA];
        #pragma GCC unroll 8
        for (int a = 1; a < NA; a++) s = _mm512_add_ps(s, acc[m * NA + a]);
        out[m] = sum_lanes(s);
    }
}

#define ROW(B, F, MB) row_dot(B, F, MB, w, rowbytes, nch, xr, tw, tf, out)
#define BY_MB(B, F) switch (MB) { case 1: ROW(B, F, 1); break; case 2: ROW(B, F, 2); break; case 3: ROW(B, F, 3); break; \
                                  case 4: ROW(B, F, 4); break; default: ROW(B, F, 8); break; }

/* constant BITS, F32 and MB: the compiler unrolls the lane and token loops and keeps the
 * accumulators in registers (MB: 1-4, or 8) */
static void row_block(int bits, int f32, int MB, const uint8_t *w, int rowbytes, int nch, const void *const *xr, __m512i tw,
                      __m512 tf, float *out) {
    if (f32) {
        if (bits == 2) { BY_MB(2, 1) } else if (bits == 3) { BY_MB(3, 1) } else { BY_MB(4, 1) }
    } else {
        if (bits == 2) { BY_MB(2, 0) } else if (bits == 3) { BY_MB(3, 0) } else { BY_MB(4, 0) }
    }
}

static inline int block_rows(int left) { return left >= 8 ? 8 : left >= 4 ? 4 : left; }

/* The bias of row n as the reference adds it: rounded to x's dtype first. */
static inline float bias_at(const void *bias, int bias_f32, int f32, int n) {
    if (!bias) return 0.f;
    const float b = entry(bias, bias_f32, n);
    return (bias_f32 && !f32) ? from_bf16(to_bf16(b)) : b;
}

/* xp (M, Kp) from compress_codebook_permute (bf16, or float32 when f32); codes uint8 (N,
 * ceil(K/8)*bits); tables (N, 2^bits) float32 when tab_f32 else bf16; bias (N) (float32 when
 * bias_f32, else bf16) or NULL; y (M, N) in x's dtype. */
int compress_codebook_linear(const void *xp, const uint8_t *codes, const void *tables, int tab_f32, const void *bias, int bias_f32,
                             void *y, int M, int N, int K, int bits, int f32, int nthreads) {
    if (bits < 2 || bits > 4 || M < 0 || N < 0 || K <= 0 || nthreads < 1) return -1;
    const int E = 1 << bits, rowbytes = (K + 7) / 8 * bits, nch = (K + CHUNK - 1) / CHUNK, Kp = nch * CHUNK;
    const int H = (N + 1) / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int i = 0; i < 2 * H; i++) {
        const int n = i / 2 + (i % 2) * H; /* two distant rows in turn: two memory streams per thread */
        if (n >= N) continue;
        const uint8_t *w = codes + (int64_t)n * rowbytes;
        const __m512i tw = f32 ? _mm512_setzero_si512() : table_bf16(tables, tab_f32, n, E);
        const __m512 tf = f32 ? table_f32(tables, tab_f32, n, E) : _mm512_setzero_ps();
        const float b = bias_at(bias, bias_f32, f32, n);
        for (int m0 = 0, MB; m0 < M; m0 += MB) {
            MB = block_rows(M - m0);
            const void *xr[MAXMB];
            float out[MAXMB];
            for (int m = 0; m < MB; m++)
                xr[m] = f32 ? (const void *)((const float *)xp + (int64_t)(m0 + m) * Kp) : (const void *)((const uint16_t *)xp + (int64_t)(m0 + m) * Kp);
            row_block(bits, f32, MB, w, rowbytes, nch, xr, tw, tf, out);
            for (int m = 0; m < MB; m++) {
                const int64_t o = (int64_t)(m0 + m) * N + n;
                if (f32) ((float *)y)[o] = out[m] + b;
                else ((uint16_t *)y)[o] = to_bf16(out[m] + b);
            }
        }
    }
    return 0;
}

static inline __attribute__((always_inline)) void dequant_row(const int BITS, const uint8_t *w, int rowbytes, int nch, __m512i tw,
                                                              __m512 tf, int f32, void *o) {
    for (int c = 0; c < nch; c++) {
        __m512i ix[4];
        decode(BITS, w + c * 16 * BITS, rowbytes - c * 16 * BITS, ix);
        for (int v = 0; v < 4; v++) {
            if (f32) {
                float *d = (float *)o + (int64_t)c * CHUNK + 32 * v;
                _mm512_storeu_ps(d, _mm512_permutexvar_ps(_mm512_unpacklo_epi16(ix[v], _mm512_setzero_si512()), tf));
                _mm512_storeu_ps(d + 16, _mm512_permutexvar_ps(_mm512_unpackhi_epi16(ix[v], _mm512_setzero_si512()), tf));
            } else {
                _mm512_storeu_si512((uint16_t *)o + (int64_t)c * CHUNK + 32 * v, _mm512_permutexvar_epi16(ix[v], tw));
            }
        }
    }
}

/* The looked-up weight in the decode order: out (N, Kp), bf16 (rounded as the reference's
 * weight.to(bfloat16)) or float32 when f32; entries past K are T[n, 0] (they meet zero x). */
int compress_codebook_dequant(const uint8_t *codes, const void *tables, int tab_f32, void *out, int N, int K, int bits, int f32,
                              int nthreads) {
    if (bits < 2 || bits > 4 || N < 0 || K <= 0 || nthreads < 1) return -1;
    const int E = 1 << bits, rowbytes = (K + 7) / 8 * bits, nch = (K + CHUNK - 1) / CHUNK, Kp = nch * CHUNK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *w = codes + (int64_t)n * rowbytes;
        const __m512i tw = f32 ? _mm512_setzero_si512() : table_bf16(tables, tab_f32, n, E);
        const __m512 tf = f32 ? table_f32(tables, tab_f32, n, E) : _mm512_setzero_ps();
        void *o = f32 ? (void *)((float *)out + (int64_t)n * Kp) : (void *)((uint16_t *)out + (int64_t)n * Kp);
        if (bits == 2) dequant_row(2, w, rowbytes, nch, tw, tf, f32, o);
        else if (bits == 3) dequant_row(3, w, rowbytes, nch, tw, tf, f32, o);
        else dequant_row(4, w, rowbytes, nch, tw, tf, f32, o);
    }
    return 0;
}
