// W4A16 / W8A16 decode GEMM for 1..16 tokens per chunk: y (M, N) = x (M, K) · Ŵᵀ (+ bias).
//
// Reads compress's kernel layout (compress/kernels/__init__.py) with no repacking:
//   x       T        (M, K), row stride ldx       T = half | bfloat16 | float
//   qw      int32    (N, KW)  KW = ceil(K / PER), PER = 32 / BITS codes per word, little-endian,
//                             code j of word w is column w·PER + j, stored unsigned (q + 2^(BITS-1))
//   scales  S        (N, G)   S = half | bfloat16 | float
//   zeros   int8     (N, G)   signed zero points, or null (symmetric)
//   g_idx   int32    (K,)     group of each column, or null (then group = k / gs, gs % PER == 0)
//   bias    T        (N,)     or null
//   y       T        (M, N), row stride ldy
//
// Decode is a stream over the weight: every code is read once and used for up to 16 tokens.
// One warp owns one output row n: its 32 lanes read consecutive int32 words of the row (128
// coalesced bytes per step), each lane dequantizes its PER codes once into registers, multiplies
// them with the up-to-16 token rows of x (x is small and stays in L1/L2), and a warp shuffle
// reduces the 32 partial sums. blockIdx.y walks chunks of 16 tokens so any M runs (prefill is
// the Triton kernel's job; this path is meant for M <= 16).
//
// Ŵ = (q - 2^(BITS-1) - z) · s is formed in float32 and rounded to T before the multiply, exactly
// as the torch reference rounds its dequantized weight to x's dtype; sums are float32.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

constexpr int MAX_M = 16;  // tokens per chunk: acc[] lives in registers
constexpr int WARPS = 4;   // rows per block

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(float v) { return v; }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }

template <typename T, typename S, int BITS>
__global__ void __launch_bounds__(32 * WARPS) wna16_decode_kernel(
    const T* __restrict__ x, const int32_t* __restrict__ qw, const S* __restrict__ scales,
    const int8_t* __restrict__ zeros, const int32_t* __restrict__ g_idx, const T* __restrict__ bias,
    T* __restrict__ y, int M, int N, int K, int KW, int G, int gs, int ldx, int ldy) {
  constexpr int PER = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  constexpr int HALF = 1 << (BITS - 1);
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * WARPS + (threadIdx.x >> 5);
  const int m0 = blockIdx.y * MAX_M;
  const int mc = min(MAX_M, M - m0);
  if (n >= N) return;  // the whole warp leaves together; no block-level barrier follows

  float acc[MAX_M];
#pragma unroll
  for (int m = 0; m < MAX_M; ++m) acc[m] = 0.f;

  const int32_t* row = qw + (size_t)n * KW;
  const T* xc = x + (size_t)m0 * ldx;
  // not unrolled by hand: `#pragma unroll 4` here doubles the build time (18 instantiations); try
  // it when tuning on a GPU (more loads in flight per lane)
  for (int w = lane; w < KW; w += 32) {
    // the weight is read exactly once: do not keep it in L1
    const uint32_t word = (uint32_t)__ldcs(row + w);
    const int k0 = w * PER;
    float wv[PER];
    if (g_idx == nullptr) {  // PER consecutive columns share one group (gs % PER == 0)
      const int g = k0 / gs;
      const float s = to_f(scales[(size_t)n * G + g]);
      const int z = zeros ? (int)zeros[(size_t)n * G + g] : 0;
#pragma unroll
      for (int j = 0; j < PER; ++j)
        wv[j] = to_f(from_f<T>((float)((int)((word >> (j * BITS)) & MASK) - HALF - z) * s));
    } else {
#pragma unroll
      for (int j = 0; j < PER; ++j) {
        const int k = min(k0 + j, K - 1);  // padding codes past K meet x = 0 below
        const int g = g_idx[k];
        const float s = to_f(scales[(size_t)n * G + g]);
        const int z = zeros ? (int)zeros[(size_t)n * G + g] : 0;
        wv[j] = to_f(from_f<T>((float)((int)((word >> (j * BITS)) & MASK) - HALF - z) * s));
      }
    }
    const bool full = k0 + PER <= K;
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
      if (m < mc) {
        const T* xr = xc + (size_t)m * ldx + k0;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < PER; ++j)
          if (full || k0 + j < K) sum += to_f(xr[j]) * wv[j];
        acc[m] += sum;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MAX_M; ++m) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
  }
  if (lane == 0) {
    const float b = bias ? to_f(bias[n]) : 0.f;
#pragma unroll
    for (int m = 0; m < MAX_M; ++m)
      if (m < mc) y[(size_t)(m0 + m) * ldy + n] = from_f<T>(acc[m] + b);
  }
}

template <typename T, typename S, int BITS>
int launch(const void* x, const void* qw, const void* scales, const void* zeros, const void* g_idx,
           const void* bias, void* y, int M, int N, int K, int KW, int G, int gs, int ldx, int ldy,
           cudaStream_t stream) {
  dim3 grid((N + WARPS - 1) / WARPS, (M + MAX_M - 1) / MAX_M);
  wna16_decode_kernel<T, S, BITS><<<grid, 32 * WARPS, 0, stream>>>(
      (const T*)x, (const int32_t*)qw, (const S*)scales, (const int8_t*)zeros, (const int32_t*)g_idx,
      (const T*)bias, (T*)y, M, N, K, KW, G, gs, ldx, ldy);
  return (int)cudaGetLastError();
}

template <typename T, typename S>
int by_bits(int bits, const void* x, const void* qw, const void* scales, const void* zeros, const void* g_idx,
            const void* bias, void* y, int M, int N, int K, int KW, int G, int gs, int ldx, int ldy,
            cudaStream_t stream) {
  if (bits == 4) return launch<T, S, 4>(x, qw, scales, zeros, g_idx, bias, y, M, N, K, KW, G, gs, ldx, ldy, stream);
  if (bits == 8) return launch<T, S, 8>(x, qw, scales, zeros, g_idx, bias, y, M, N, K, KW, G, gs, ldx, ldy, stream);
  return -1;
}

template <typename T>
int by_scale(int s_code, int bits, const void* x, const void* qw, const void* scales, const void* zeros,
             const void* g_idx, const void* bias, void* y, int M, int N, int K, int KW, int G, int gs,
             int ldx, int ldy, cudaStream_t stream) {
  if (s_code == 0) return by_bits<T, __half>(bits, x, qw, scales, zeros, g_idx, bias, y, M, N, K, KW, G, gs, ldx, ldy, stream);
  if (s_code == 1) return by_bits<T, __nv_bfloat16>(bits, x, qw, scales, zeros, g_idx, bias, y, M, N, K, KW, G, gs, ldx, ldy, stream);
  if (s_code == 2) return by_bits<T, float>(bits, x, qw, scales, zeros, g_idx, bias, y, M, N, K, KW, G, gs, ldx, ldy, stream);
  return -1;
}

}  // namespace

// dtype codes (activations and scales): 0 = float16, 1 = bfloat16, 2 = float32.
// Returns 0 on success, a cudaError_t from the launch, or -1 for an unsupported combination.
extern "C" int compress_wna16_decode(int x_code, int s_code, int bits, const void* x, const void* qw,
                                     const void* scales, const void* zeros, const void* g_idx,
                                     const void* bias, void* y, int M, int N, int K, int KW, int G,
                                     int gs, int ldx, int ldy, void* stream) {
  cudaStream_t st = (cudaStream_t)stream;
  if (x_code == 0) return by_scale<__half>(s_code, bits, x, qw, scales, zeros, g_idx, bias, y, M, N, K, KW, G, gs, ldx, ldy, st);
  if (x_code == 1) return by_scale<__nv_bfloat16>(s_code, bits, x, qw, scales, zeros, g_idx, bias, y, M, N, K, KW, G, gs, ldx, ldy, st);
  if (x_code == 2) return by_scale<float>(s_code, bits, x, qw, scales, zeros, g_idx, bias, y, M, N, K, KW, G, gs, ldx, ldy, st);
  return -1;
}
