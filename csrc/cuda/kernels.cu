// tuneforge's CUDA kernels: flash attention (forward, and a backward that recomputes the scores from the saved
// log-sum-exp) and the multi-LoRA row kernels (shrink, expand, per-segment weight gradients).
//
// Design, kept simple on purpose (written and compiled without a GPU at hand; see csrc/README.md):
// - Attention gives each thread one query row (forward, dQ) or one key row (dK, dV) and stages tiles of the
//   other side in shared memory, so every thread reads the same shared element at once (a broadcast, no bank
//   conflict) and nothing is accumulated with atomics. Math is float32 whatever the storage type; a (T, T)
//   matrix is never formed: memory is O(T D).
// - The LoRA kernels are gather kernels in the style of Punica's BGMV: each row reads its own adapter's
//   matrices, so a batch with many adapters costs one launch per step, not one per adapter.
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <type_traits>

namespace tuneforge {
namespace cuda {
namespace {

constexpr int kRows = 64;   // rows (queries or keys) per block: one thread each
constexpr int kTile = 32;   // rows of the other side staged in shared memory at a time
constexpr float kNegInf = -__builtin_huge_valf();

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ---- attention --------------------------------------------------------------------------------------------

// Stage rows [r0, r0 + kTile) of a (T, D) matrix into shared memory as float (zeros past the end).
template <typename T, int D>
__device__ __forceinline__ void stage(float (*dst)[D], const T* src, int64_t r0, int64_t rows) {
  for (int idx = threadIdx.x; idx < kTile * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    dst[r][d] = r0 + r < rows ? to_float(src[(r0 + r) * D + d]) : 0.f;
  }
}

// One block: kRows queries of one (b, h). grid (B * H, ceil(Tq / kRows)).
template <typename T, int D>
__global__ void __launch_bounds__(kRows) attention_forward_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                                  const T* __restrict__ v,
                                                                  const bool* __restrict__ pad, T* __restrict__ out,
                                                                  float* __restrict__ lse, int64_t H, int64_t Tq,
                                                                  int64_t Tk, bool causal, float scale) {
  __shared__ float ks[kTile][D];
  __shared__ float vs[kTile][D];
  __shared__ bool real[kTile];
  const int64_t bh = blockIdx.x, b = bh / H, q0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int64_t i = q0 + threadIdx.x, offset = Tk - Tq;
  const bool active = i < Tq;
  const T* qb = q + bh * Tq * D;
  const T* kb = k + bh * Tk * D;
  const T* vb = v + bh * Tk * D;

  float qr[D], acc[D];  // (D,) this query, scaled; (D,) the running sum of p v
#pragma unroll
  for (int d = 0; d < D; ++d) {
    qr[d] = active ? to_float(qb[i * D + d]) * scale : 0.f;
    acc[d] = 0.f;
  }
  float m = kNegInf, l = 0.f;  // running max and sum of exp(s - m)
  const int64_t last = causal ? i + offset : Tk - 1;  // the last key this query sees
  const int64_t end = causal ? min64(Tk, min64(q0 + kRows, Tq) + offset) : Tk;  // keys any query here sees
  for (int64_t k0 = 0; k0 < end; k0 += kTile) {
    __syncthreads();  // the previous tile is no longer read
    stage<T, D>(ks, kb, k0, Tk);
    stage<T, D>(vs, vb, k0, Tk);
    if (threadIdx.x < kTile) {
      const int64_t j = k0 + threadIdx.x;
      real[threadIdx.x] = j < Tk && (pad == nullptr || pad[b * Tk + j]);
    }
    __syncthreads();
    if (!active) continue;
    float s[kTile];
    float tile_max = kNegInf;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      float dot = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) dot += qr[d] * ks[j][d];
      s[j] = real[j] && k0 + j <= last ? dot : kNegInf;
      tile_max = fmaxf(tile_max, s[j]);
    }
    if (tile_max == kNegInf) continue;  // nothing visible in this tile
    const float m_new = fmaxf(m, tile_max);
    const float correction = __expf(m - m_new);  // 0 while m is still -inf
    l *= correction;
#pragma unroll
    for (int d = 0; d < D; ++d) acc[d] *= correction;
#pragma unroll
    for (int j = 0; j < kTile; ++j) {
      const float p = __expf(s[j] - m_new);  // exactly 0 for a masked key
      l += p;
#pragma unroll
      for (int d = 0; d < D; ++d) acc[d] += p * vs[j][d];
    }
    m = m_new;
  }
  if (!active) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;  // a query that saw no key: zeros, lse = -inf
#pragma unroll
  for (int d = 0; d < D; ++d) out[bh * Tq * D + i * D + d] = from_float<T>(acc[d] * inv);
  lse[bh * Tq + i] = l > 0.f ? m + __logf(l) : kNegInf;
}

// dQ: one thread per query. dq = scale * sum_j p_ij (dp_ij - delta_i) k_j with p = exp(s - lse), dp = dO v^T.
template <typename T, int D>
__global__ void __launch_bounds__(kRows) attention_backward_dq_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ grad,
    const float* __restrict__ lse, const float* __restrict__ delta, const bool* __restrict__ pad, T* __restrict__ dq,
    int64_t H, int64_t Tq, int64_t Tk, bool causal, float scale) {
  __shared__ float ks[kTile][D];
  __shared__ float vs[kTile][D];
  __shared__ bool real[kTile];
  const int64_t bh = blockIdx.x, b = bh / H, q0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int64_t i = q0 + threadIdx.x, offset = Tk - Tq;
  const bool active = i < Tq;
  const float li = active ? lse[bh * Tq + i] : kNegInf;
  const float di = active ? delta[bh * Tq + i] : 0.f;
  const bool sees = li != kNegInf;  // a query that saw no key has no gradient
  float qr[D], gr[D], acc[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    qr[d] = active ? to_float(q[bh * Tq * D + i * D + d]) * scale : 0.f;
    gr[d] = active ? to_float(grad[bh * Tq * D + i * D + d]) : 0.f;
    acc[d] = 0.f;
  }
  const int64_t last = causal ? i + offset : Tk - 1;
  const int64_t end = causal ? min64(Tk, min64(q0 + kRows, Tq) + offset) : Tk;
  for (int64_t k0 = 0; k0 < end; k0 += kTile) {
    __syncthreads();
    stage<T, D>(ks, k + bh * Tk * D, k0, Tk);
    stage<T, D>(vs, v + bh * Tk * D, k0, Tk);
    if (threadIdx.x < kTile) {
      const int64_t j = k0 + threadIdx.x;
      real[threadIdx.x] = j < Tk && (pad == nullptr || pad[b * Tk + j]);
    }
    __syncthreads();
    if (!active || !sees) continue;
#pragma unroll 4
    for (int j = 0; j < kTile; ++j) {
      if (!real[j] || k0 + j > last) continue;
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        s += qr[d] * ks[j][d];
        dp += gr[d] * vs[j][d];
      }
      const float ds = __expf(s - li) * (dp - di);
#pragma unroll
      for (int d = 0; d < D; ++d) acc[d] += ds * ks[j][d];
    }
  }
  if (!active) return;
#pragma unroll
  for (int d = 0; d < D; ++d) dq[bh * Tq * D + i * D + d] = from_float<T>(acc[d] * scale);
}

// dK, dV: one thread per key, the queries that see it staged in tiles. dv = sum_i p_ij dO_i,
// dk = scale * sum_i p_ij (dp_ij - delta_i) q_i.
template <typename T, int D>
__global__ void __launch_bounds__(kRows) attention_backward_dkdv_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ grad,
    const float* __restrict__ lse, const float* __restrict__ delta, const bool* __restrict__ pad, T* __restrict__ dk,
    T* __restrict__ dv, int64_t H, int64_t Tq, int64_t Tk, bool causal, float scale) {
  __shared__ float qs[kTile][D];
  __shared__ float gs[kTile][D];
  __shared__ float ls[kTile];
  __shared__ float ds_[kTile];
  const int64_t bh = blockIdx.x, b = bh / H, j0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int64_t j = j0 + threadIdx.x, offset = Tk - Tq;
  const bool active = j < Tk && (pad == nullptr || pad[b * Tk + j]);  // a padded key has no gradient
  float kr[D], vr[D], dka[D], dva[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    kr[d] = active ? to_float(k[bh * Tk * D + j * D + d]) * scale : 0.f;
    vr[d] = active ? to_float(v[bh * Tk * D + j * D + d]) : 0.f;
    dka[d] = 0.f;
    dva[d] = 0.f;
  }
  const int64_t start = causal ? max64(0, j0 - offset) : 0;  // the first query that sees any key here
  for (int64_t i0 = start; i0 < Tq; i0 += kTile) {
    __syncthreads();
    stage<T, D>(qs, q + bh * Tq * D, i0, Tq);
    stage<T, D>(gs, grad + bh * Tq * D, i0, Tq);
    if (threadIdx.x < kTile) {
      const int64_t i = i0 + threadIdx.x;
      ls[threadIdx.x] = i < Tq ? lse[bh * Tq + i] : kNegInf;
      ds_[threadIdx.x] = i < Tq ? delta[bh * Tq + i] : 0.f;
    }
    __syncthreads();
    if (!active) continue;
#pragma unroll 4
    for (int r = 0; r < kTile; ++r) {
      const int64_t i = i0 + r;
      if (ls[r] == kNegInf || (causal && j > i + offset)) continue;  // past the end, unseen, or sees no key
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        s += kr[d] * qs[r][d];
        dp += vr[d] * gs[r][d];
      }
      const float p = __expf(s - ls[r]);
      const float dsc = p * (dp - ds_[r]);
#pragma unroll
      for (int d = 0; d < D; ++d) {
        dva[d] += p * gs[r][d];
        dka[d] += dsc * qs[r][d];
      }
    }
  }
  if (j >= Tk) return;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    dk[bh * Tk * D + j * D + d] = from_float<T>(dka[d] * scale);
    dv[bh * Tk * D + j * D + d] = from_float<T>(dva[d]);
  }
}

// ---- multi-LoRA -------------------------------------------------------------------------------------------

// The adapter of row t; ids outside [0, count) mean none (the Python face validates ids; this keeps memory safe).
__device__ __forceinline__ int64_t adapter_of(const AdapterMatrices& w, int64_t t) {
  const int64_t a = w.ids[t / w.rows_per_id];
  return a < w.count ? a : -1;
}

template <typename T>
__device__ __forceinline__ float weight_at(const AdapterMatrices& w, int64_t a, int64_t i, int64_t j) {
  return to_float(static_cast<const T*>(w.w)[a * w.stride_a + i * w.stride_i + j * w.stride_j]);
}

// One block per row t; each warp computes outputs i = warp, warp + warps, ... as a lane-strided dot product.
template <typename T>
__global__ void lora_shrink_kernel(const T* __restrict__ x, AdapterMatrices w, const float* __restrict__ scalings,
                                   float* __restrict__ y, int64_t K, int64_t R) {
  const int64_t t = blockIdx.x;
  const int64_t a = adapter_of(w, t);  // the same for the whole block: no divergence
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const float s = a >= 0 && scalings != nullptr ? scalings[a] : 1.f;
  for (int64_t i = warp; i < R; i += warps) {
    float sum = 0.f;
    if (a >= 0) {
      for (int64_t kk = lane; kk < K; kk += 32) sum += to_float(x[t * K + kk]) * weight_at<T>(w, a, i, kk);
    }
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, off);
    if (lane == 0) y[t * R + i] = a >= 0 ? s * sum : 0.f;
  }
}

// grid (M, column blocks); the row's R inputs sit in shared memory, each thread owns output columns.
template <typename T>
__global__ void lora_expand_kernel(const float* __restrict__ y, AdapterMatrices w, T* __restrict__ out, int64_t R,
                                   int64_t O) {
  extern __shared__ float ys[];  // (R,)
  const int64_t t = blockIdx.x;
  const int64_t a = adapter_of(w, t);
  if (a < 0) return;  // uniform over the block, before any barrier
  for (int64_t i = threadIdx.x; i < R; i += blockDim.x) ys[i] = y[t * R + i];
  __syncthreads();
  for (int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; o < O;
       o += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    float sum = 0.f;
    for (int64_t i = 0; i < R; ++i) sum += ys[i] * weight_at<T>(w, a, o, i);
    out[t * O + o] = from_float<T>(to_float(out[t * O + o]) + sum);
  }
}

// grid (ceil(P Q / threads), A); each thread owns one (p, q) of one adapter and sums over that adapter's rows.
__global__ void segment_outer_kernel(const float* __restrict__ u, const float* __restrict__ v,
                                     const int64_t* __restrict__ order, const int64_t* __restrict__ starts,
                                     float* __restrict__ d, int64_t P, int64_t Q) {
  const int64_t a = blockIdx.y;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= P * Q) return;
  const int64_t p = idx / Q, qq = idx % Q;
  float sum = 0.f;
  for (int64_t n = starts[a]; n < starts[a + 1]; ++n) {
    const int64_t t = order[n];
    sum += u[t * P + p] * v[t * Q + qq];
  }
  d[(a * P + p) * Q + qq] = sum;
}

// ---- dispatch ---------------------------------------------------------------------------------------------

template <typename F>
cudaError_t with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t with_head_dim(int64_t head_dim, F&& f) {
  switch (head_dim) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
  }
  return cudaErrorInvalidValue;
}

dim3 attention_grid(const AttentionShape& s, int64_t rows) {
  return dim3(static_cast<unsigned>(s.batch * s.heads), static_cast<unsigned>((rows + kRows - 1) / kRows));
}

}  // namespace

cudaError_t attention_forward(DType dtype, const void* q, const void* k, const void* v, const bool* pad, void* out,
                              float* lse, AttentionShape shape, bool causal, float scale, cudaStream_t stream) {
  if (shape.tq == 0 || shape.batch * shape.heads == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return with_head_dim(shape.head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      attention_forward_kernel<T, D><<<attention_grid(shape, shape.tq), kRows, 0, stream>>>(
          static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), pad, static_cast<T*>(out),
          lse, shape.heads, shape.tq, shape.tk, causal, scale);
      return cudaGetLastError();
    });
  });
}

cudaError_t attention_backward(DType dtype, const void* q, const void* k, const void* v, const void* grad,
                               const float* lse, const float* delta, const bool* pad, void* dq, void* dk, void* dv,
                               AttentionShape shape, bool causal, float scale, cudaStream_t stream) {
  if (shape.batch * shape.heads == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return with_head_dim(shape.head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      const T *qt = static_cast<const T*>(q), *kt = static_cast<const T*>(k), *vt = static_cast<const T*>(v);
      const T* gt = static_cast<const T*>(grad);
      if (shape.tq > 0) {
        attention_backward_dq_kernel<T, D><<<attention_grid(shape, shape.tq), kRows, 0, stream>>>(
            qt, kt, vt, gt, lse, delta, pad, static_cast<T*>(dq), shape.heads, shape.tq, shape.tk, causal, scale);
        if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
      }
      if (shape.tk > 0) {
        attention_backward_dkdv_kernel<T, D><<<attention_grid(shape, shape.tk), kRows, 0, stream>>>(
            qt, kt, vt, gt, lse, delta, pad, static_cast<T*>(dk), static_cast<T*>(dv), shape.heads, shape.tq,
            shape.tk, causal, scale);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t lora_shrink(DType dtype, const void* x, AdapterMatrices w, const float* scalings, float* y, int64_t M,
                        int64_t K, int64_t R, cudaStream_t stream) {
  if (M == 0 || R == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int warps = R < 8 ? static_cast<int>(R) : 8;
    lora_shrink_kernel<T><<<static_cast<unsigned>(M), 32 * warps, 0, stream>>>(static_cast<const T*>(x), w,
                                                                               scalings, y, K, R);
    return cudaGetLastError();
  });
}

cudaError_t lora_expand(DType dtype, const float* y, AdapterMatrices w, void* out, int64_t M, int64_t R, int64_t O,
                        cudaStream_t stream) {
  if (M == 0 || O == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int threads = 256;
    const int64_t column_blocks = (O + threads - 1) / threads;
    const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(column_blocks < 65535 ? column_blocks : 65535));
    lora_expand_kernel<T><<<grid, threads, R * sizeof(float), stream>>>(y, w, static_cast<T*>(out), R, O);
    return cudaGetLastError();
  });
}

cudaError_t segment_outer(const float* u, const float* v, const int64_t* order, const int64_t* starts, float* d,
                          int64_t A, int64_t P, int64_t Q, cudaStream_t stream) {
  if (A == 0 || P * Q == 0) return cudaSuccess;
  constexpr int threads = 256;
  const dim3 grid(static_cast<unsigned>((P * Q + threads - 1) / threads), static_cast<unsigned>(A));
  segment_outer_kernel<<<grid, threads, 0, stream>>>(u, v, order, starts, d, P, Q);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tuneforge
