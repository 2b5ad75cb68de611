// Launchers of tuneforge's CUDA kernels (csrc/cuda/kernels.cu), on raw pointers.
//
// The kernels include no torch header, so nvcc compiles them wherever the CUDA toolkit is (tests check that
// on machines without a GPU or a CUDA build of torch); csrc/cuda/ops_cuda.cpp binds them to the torch.library
// ops. Every launcher returns the launch's cudaError_t. Tensors are contiguous, row-major.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace tuneforge {
namespace cuda {

// Storage types with compiled kernels (math is float32 in both); float16 is converted by the caller.
enum class DType { kFloat32, kBFloat16 };

// Head dimensions with a compiled attention kernel; other sizes run the pure-torch reference.
constexpr bool attention_supports(int64_t head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
}

struct AttentionShape {
  int64_t batch, heads, tq, tk, head_dim;
};

// out (B, H, Tq, D) in `dtype`, lse (B, H, Tq) float32 (-inf where a query sees no key, whose output is 0).
// q (B, H, Tq, D), k and v (B, H, Tk, D) in `dtype`; pad (B, Tk) bool or null, true = a real key. causal is
// bottom-right aligned: query i sees keys 0 .. Tk - Tq + i.
cudaError_t attention_forward(DType dtype, const void* q, const void* k, const void* v, const bool* pad, void* out,
                              float* lse, AttentionShape shape, bool causal, float scale, cudaStream_t stream);

// dq, dk, dv in `dtype` from grad = dL/dout, the forward's lse and delta = rowsum(grad * out) (B, H, Tq) float32.
cudaError_t attention_backward(DType dtype, const void* q, const void* k, const void* v, const void* grad,
                               const float* lse, const float* delta, const bool* pad, void* dq, void* dk, void* dv,
                               AttentionShape shape, bool causal, float scale, cudaStream_t stream);

// Where row t of a LoRA kernel finds its matrix: adapter a = ids[t / rows_per_id] (-1, or an id >= count: none),
// element (i, j) of that adapter's matrix at w[a * stride_a + i * stride_i + j * stride_j]. Transposes are
// strides, not copies.
struct AdapterMatrices {
  const void* w;
  const int64_t* ids;
  int64_t rows_per_id, count;
  int64_t stride_a, stride_i, stride_j;
};

// "shrink": y (M, R) float32, y[t][i] = scale[a] * sum_k x[t][k] w_a(i, k); rows without an adapter get 0.
// x (M, K) in `dtype`; scalings (A,) float32, or null for 1.
cudaError_t lora_shrink(DType dtype, const void* x, AdapterMatrices w, const float* scalings, float* y, int64_t M,
                        int64_t K, int64_t R, cudaStream_t stream);

// "expand": out[t][o] += sum_i y[t][i] w_a(o, i), out (M, O) in `dtype`, y (M, R) float32; rows without an adapter
// are left as they are.
cudaError_t lora_expand(DType dtype, const float* y, AdapterMatrices w, void* out, int64_t M, int64_t R, int64_t O,
                        cudaStream_t stream);

// Per-adapter sums of outer products, the weight gradients of the segments: d[a] (P, Q) = sum over the rows
// order[starts[a] .. starts[a + 1]) of u[t]^T v[t]; u (M, P), v (M, Q), d (A, P, Q), all float32.
cudaError_t segment_outer(const float* u, const float* v, const int64_t* order, const int64_t* starts, float* d,
                          int64_t A, int64_t P, int64_t Q, cudaStream_t stream);

}  // namespace cuda
}  // namespace tuneforge
