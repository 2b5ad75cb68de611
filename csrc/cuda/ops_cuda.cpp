// CUDA implementations of the tuneforge ops declared in csrc/ops.cpp and csrc/attention.cpp: flash attention and
// multi_lora_linear run the kernels of csrc/cuda/kernels.cu; lora_linear and the bottleneck adapters, whose cost
// is cuBLAS GEMMs, use the device-generic ATen compositions of ops.cpp (registered for CUDA there).
// Built only where torch has CUDA (core/kernels/build.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "kernels.h"

namespace tuneforge {

namespace {

cuda::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "tuneforge::", op, " (CUDA): float32 or bfloat16 tensors, got ", t.scalar_type());
  }
}

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "tuneforge::", op, " (CUDA): ", cudaGetErrorString(err));
}

cuda::AttentionShape attention_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "tuneforge::", op, ": q, k, v (B, H, T, D)");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "tuneforge::", op, ": q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not fit");
  TORCH_CHECK(cuda::attention_supports(q.size(3)), "tuneforge::", op, " (CUDA): head size ", q.size(3),
              " has no kernel (16, 32, 64, 128)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "tuneforge::", op,
              ": q, k, v of one dtype");
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}

const bool* padding(const c10::optional<at::Tensor>& mask, at::Tensor& keep, const cuda::AttentionShape& s) {
  if (!mask.has_value()) return nullptr;
  keep = mask->to(at::kBool).contiguous();
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == s.batch && keep.size(1) == s.tk,
              "tuneforge::flash_attention: key_padding_mask must be (B, Tk)");
  return keep.data_ptr<bool>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attention_forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                const at::Tensor& v_in, bool causal,
                                                                const c10::optional<at::Tensor>& key_padding_mask,
                                                                double scale) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto shape = attention_shape(q_in, k_in, v_in, "flash_attention_forward");
  TORCH_CHECK(!causal || shape.tq <= shape.tk, "tuneforge::flash_attention: causal needs Tq <= Tk");
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor mask;
  const bool* pad = padding(key_padding_mask, mask, shape);
  auto out = at::empty_like(q);
  auto lse = at::empty({shape.batch, shape.heads, shape.tq}, q.options().dtype(at::kFloat));
  check(cuda::attention_forward(dtype_of(q, "flash_attention_forward"), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                pad, out.data_ptr(), lse.data_ptr<float>(), shape, causal, static_cast<float>(scale),
                                c10::cuda::getCurrentCUDAStream()),
        "flash_attention_forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, bool causal, const c10::optional<at::Tensor>& key_padding_mask,
    double scale) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto shape = attention_shape(q_in, k_in, v_in, "flash_attention_backward");
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto grad = grad_in.to(q.scalar_type()).contiguous();
  const auto lse = lse_in.to(at::kFloat).contiguous();
  const auto delta = (grad.to(at::kFloat) * out_in.to(at::kFloat)).sum(-1).contiguous();  // (B, H, Tq)
  at::Tensor mask;
  const bool* pad = padding(key_padding_mask, mask, shape);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  check(cuda::attention_backward(dtype_of(q, "flash_attention_backward"), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                 grad.data_ptr(), lse.data_ptr<float>(), delta.data_ptr<float>(), pad, dq.data_ptr(),
                                 dk.data_ptr(), dv.data_ptr(), shape, causal, static_cast<float>(scale),
                                 c10::cuda::getCurrentCUDAStream()),
        "flash_attention_backward");
  return {dq, dk, dv};
}

namespace {

// Row t of (M, features) belongs to sample t / L, whose adapter is adapter_ids[t / L].
cuda::AdapterMatrices matrices(const at::Tensor& w, const at::Tensor& ids, int64_t L, bool transposed) {
  // w (A, I, J) contiguous; transposed: element (i, j) of the kernel's view is w[a][j][i]
  return {w.data_ptr(), ids.data_ptr<int64_t>(), L, w.size(0), w.stride(0), transposed ? 1 : w.stride(1),
          transposed ? w.stride(1) : 1};
}

struct LoraInputs {
  at::Tensor x2, a, b, s, ids;  // (M, in), (A, r, in), (A, out, r), (A,) float32, (N,) int64
  int64_t N, L, M, in, out, r;
};

LoraInputs lora_inputs(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                       const at::Tensor& scalings, const at::Tensor& adapter_ids) {
  TORCH_CHECK(lora_a.dim() == 3 && lora_b.dim() == 3 && lora_a.size(0) == lora_b.size(0) &&
                  lora_a.size(1) == lora_b.size(2) && lora_a.size(2) == x.size(-1),
              "tuneforge::multi_lora_linear: lora_a (A, r, in), lora_b (A, out, r), x (N, ..., in)");
  TORCH_CHECK(adapter_ids.dim() == 1 && adapter_ids.size(0) == x.size(0), "tuneforge::multi_lora_linear: ",
              adapter_ids.numel(), " adapter ids for ", x.size(0), " rows");
  TORCH_CHECK(lora_a.scalar_type() == x.scalar_type() && lora_b.scalar_type() == x.scalar_type(),
              "tuneforge::multi_lora_linear (CUDA): x and the adapters of one dtype");
  LoraInputs in;
  in.N = x.size(0);
  in.in = x.size(-1);
  in.M = x.numel() / std::max<int64_t>(in.in, 1);
  in.L = in.N > 0 ? in.M / in.N : 0;
  in.out = lora_b.size(1);
  in.r = lora_a.size(1);
  in.x2 = x.reshape({in.M, in.in}).contiguous();
  in.a = lora_a.contiguous();
  in.b = lora_b.contiguous();
  in.s = scalings.to(x.device(), at::kFloat).contiguous();
  in.ids = adapter_ids.to(x.device(), at::kLong).contiguous();
  return in;
}

}  // namespace

// Base product (cuBLAS), then every row's own update: shrink through its A, expand through its B.
at::Tensor multi_lora_linear_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                  const at::Tensor& lora_b, const at::Tensor& scalings, const at::Tensor& adapter_ids) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto in = lora_inputs(x, lora_a, lora_b, scalings, adapter_ids);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = weight.has_value()
                       ? (bias.has_value() ? at::addmm(*bias, in.x2, weight->t()) : at::mm(in.x2, weight->t()))
                       : at::zeros({in.M, in.out}, x.options());
  out = out.contiguous();
  auto low = at::empty({in.M, in.r}, x.options().dtype(at::kFloat));  // (M, r) = s x A^T
  const auto dtype = dtype_of(x, "multi_lora_linear");
  check(cuda::lora_shrink(dtype, in.x2.data_ptr(), matrices(in.a, in.ids, in.L, false), in.s.data_ptr<float>(),
                          low.data_ptr<float>(), in.M, in.in, in.r, stream),
        "multi_lora_linear");
  check(cuda::lora_expand(dtype, low.data_ptr<float>(), matrices(in.b, in.ids, in.L, false), out.data_ptr(), in.M,
                          in.r, in.out, stream),
        "multi_lora_linear");
  auto shape = x.sizes().vec();
  shape.back() = in.out;
  return out.view(shape);
}

// dx = g W + (s g B) A per row; dA[a] and dB[a] sum outer products over adapter a's rows (one stable sort
// groups them; segment bounds by binary search, so nothing waits on the host).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_lora_linear_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scalings, const at::Tensor& adapter_ids, c10::List<bool> needs_list) {
  const c10::cuda::CUDAGuard guard(x.device());
  bool needs[5];
  for (size_t i = 0; i < 5; ++i) needs[i] = needs_list.get(i);
  const auto in = lora_inputs(x, lora_a, lora_b, scalings, adapter_ids);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto dtype = dtype_of(x, "multi_lora_linear_backward");
  const auto g2 = grad.reshape({in.M, in.out}).to(x.scalar_type()).contiguous();  // (M, out)
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t A = in.a.size(0);
  at::Tensor dx, dw, db, da, dbb;
  at::Tensor gb;  // (M, r) = s g B, shared by dx and dA
  if (needs[0] || needs[3]) {
    gb = at::empty({in.M, in.r}, f32);
    check(cuda::lora_shrink(dtype, g2.data_ptr(), matrices(in.b, in.ids, in.L, /*transposed=*/true),
                            in.s.data_ptr<float>(), gb.data_ptr<float>(), in.M, in.out, in.r, stream),
          "multi_lora_linear_backward");
  }
  if (needs[0]) {
    dx = (weight.has_value() ? at::mm(g2, *weight) : at::zeros({in.M, in.in}, x.options())).contiguous();
    check(cuda::lora_expand(dtype, gb.data_ptr<float>(), matrices(in.a, in.ids, in.L, /*transposed=*/true),
                            dx.data_ptr(), in.M, in.r, in.in, stream),
          "multi_lora_linear_backward");
    dx = dx.view(x.sizes());
  }
  if (needs[1] && weight.has_value()) dw = at::mm(g2.t(), in.x2);
  if (needs[2]) db = g2.sum(0);
  if (needs[3] || needs[4]) {
    const auto row_ids = in.ids.repeat_interleave(in.L);  // (M,) each row's adapter
    const auto sorted = at::sort(row_ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const auto& order = std::get<1>(sorted);
    const auto starts = at::searchsorted(std::get<0>(sorted), at::arange(A + 1, row_ids.options()));  // (A + 1,)
    if (needs[3]) {
      const auto x32 = in.x2.to(at::kFloat).contiguous();
      auto d = at::empty({A, in.r, in.in}, f32);
      check(cuda::segment_outer(gb.data_ptr<float>(), x32.data_ptr<float>(), order.data_ptr<int64_t>(),
                                starts.data_ptr<int64_t>(), d.data_ptr<float>(), A, in.r, in.in, stream),
            "multi_lora_linear_backward");
      da = d.to(lora_a.scalar_type());
    }
    if (needs[4]) {
      auto low = at::empty({in.M, in.r}, f32);  // s x A^T again: cheaper to recompute than to keep
      check(cuda::lora_shrink(dtype, in.x2.data_ptr(), matrices(in.a, in.ids, in.L, false), in.s.data_ptr<float>(),
                              low.data_ptr<float>(), in.M, in.in, in.r, stream),
            "multi_lora_linear_backward");
      const auto g32 = g2.to(at::kFloat).contiguous();
      auto d = at::empty({A, in.out, in.r}, f32);
      check(cuda::segment_outer(g32.data_ptr<float>(), low.data_ptr<float>(), order.data_ptr<int64_t>(),
                                starts.data_ptr<int64_t>(), d.data_ptr<float>(), A, in.out, in.r, stream),
            "multi_lora_linear_backward");
      dbb = d.to(lora_b.scalar_type());
    }
  }
  return {dx, dw, db, da, dbb};
}

TORCH_LIBRARY_IMPL(tuneforge, CUDA, m) {
  m.impl("flash_attention_forward", &flash_attention_forward_cuda);
  m.impl("flash_attention_backward", &flash_attention_backward_cuda);
  m.impl("multi_lora_linear", &multi_lora_linear_cuda);
  m.impl("multi_lora_linear_backward", &multi_lora_linear_backward_cuda);
}

}  // namespace tuneforge
