// CUDA implementations of the tuneforge ops declared in csrc/ops.cpp and csrc/attention.cpp: flash attention and
// multi_lora_linear run the kernels of csrc/cuda/kernels.cu; lora_linear and the bottleneck adapters, whose cost
// is cuBLAS GEMMs, use the device-generic ATen compositions of ops.cpp (registered for CUDA there).
// Built only where torch has CUDA (core/kernels/build.py).
//
// The attention kernel runs only when forced (TUNEFORGE_KERNELS=cpp); the Python face sends packed documents
// (cu_seqlens) and head sizes without a kernel to torch SDPA, so those are refused here with a clear error.
// Grouped-query k/v is expanded to q's heads around the kernels (their gradients summed back per group).
// Every input's device, dtype and shape is checked, and it is made contiguous, before a kernel gets a pointer.
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

// Every tensor a kernel reads must live on q's CUDA device: a CPU tensor's data_ptr would be a host pointer in
// device code (an illegal address, or silently wrong reads), another GPU's would be read across devices.
void check_device(const at::Tensor& t, const at::Tensor& q, const char* name, const char* op) {
  TORCH_CHECK(t.device() == q.device(), "tuneforge::", op, " (CUDA): ", name, " is on ", t.device(), " but q is on ",
              q.device(), "; move it with .to(q.device) before the call");
}

// Shapes, dtypes and devices of q, k, v (and the padding mask), checked before any pointer is taken.
// q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with Hkv dividing H (grouped-query attention).
cuda::AttentionShape attention_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& cu_seqlens,
                                     const char* op) {
  TORCH_CHECK(q.is_cuda(), "tuneforge::", op, " (CUDA): q is on ", q.device());
  check_device(k, q, "k", op);
  check_device(v, q, "v", op);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "tuneforge::", op, ": q, k, v must be (B, H, T, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(3) == k.size(3) && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0,
              "tuneforge::", op, ": k and v must be (B, Hkv, Tk, D) with Hkv dividing q's heads; q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(cuda::attention_supports(q.size(3)), "tuneforge::", op, " (CUDA): head size ", q.size(3),
              " has no kernel (16, 32, 64, 128); tuneforge.kernels.flash_attention runs torch SDPA for it");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "tuneforge::", op,
              ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  dtype_of(q, op);  // float32 or bfloat16, else a clear error
  TORCH_CHECK(!cu_seqlens.has_value(), "tuneforge::", op, " (CUDA): packed documents (cu_seqlens) have no CUDA "
              "kernel; call tuneforge.kernels.flash_attention, which runs them through torch SDPA");
  if (mask.has_value()) {
    check_device(*mask, q, "key_padding_mask", op);
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == k.size(2), "tuneforge::", op,
                ": key_padding_mask must be (B, Tk) = (", q.size(0), ", ", k.size(2), "), got ", mask->sizes());
  }
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}

// k or v with its heads repeated to q's (B, Hkv, Tk, D) -> (B, H, Tk, D), contiguous: the kernels index one k/v
// head per q head. Key/value head j serves query heads j*H/Hkv .. (j+1)*H/Hkv - 1.
at::Tensor heads_like_q(const at::Tensor& t, int64_t heads) {
  if (t.size(1) == heads) return t.contiguous();
  return t.repeat_interleave(heads / t.size(1), /*dim=*/1).contiguous();
}

// The expanded k/v gradient (B, H, Tk, D) summed back over each group to (B, Hkv, Tk, D), in float32.
at::Tensor sum_groups(const at::Tensor& d, const at::Tensor& like) {
  if (d.size(1) == like.size(1)) return d;
  const int64_t kv = like.size(1), group = d.size(1) / kv;
  return d.to(at::kFloat).view({d.size(0), kv, group, d.size(2), d.size(3)}).sum(2).to(like.scalar_type());
}

const bool* padding(const c10::optional<at::Tensor>& mask, at::Tensor& keep) {
  if (!mask.has_value()) return nullptr;
  keep = mask->to(at::kBool).contiguous();  // on q's device (checked): the kernel reads it there
  return keep.data_ptr<bool>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attention_forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                const at::Tensor& v_in, bool causal,
                                                                const c10::optional<at::Tensor>& key_padding_mask,
                                                                const c10::optional<at::Tensor>& cu_seqlens,
                                                                double scale) {
  const char* op = "flash_attention_forward";
  const auto shape = attention_shape(q_in, k_in, v_in, key_padding_mask, cu_seqlens, op);
  const c10::cuda::CUDAGuard guard(q_in.device());
  TORCH_CHECK(!causal || shape.tq <= shape.tk, "tuneforge::", op, ": causal needs Tq <= Tk, got Tq=", shape.tq,
              ", Tk=", shape.tk);
  const auto q = q_in.contiguous(), k = heads_like_q(k_in, shape.heads), v = heads_like_q(v_in, shape.heads);
  at::Tensor mask;
  const bool* pad = padding(key_padding_mask, mask);
  auto out = at::empty_like(q);
  auto lse = at::empty({shape.batch, shape.heads, shape.tq}, q.options().dtype(at::kFloat));
  check(cuda::attention_forward(dtype_of(q, op), q.data_ptr(), k.data_ptr(), v.data_ptr(), pad, out.data_ptr(),
                                lse.data_ptr<float>(), shape, causal, static_cast<float>(scale),
                                c10::cuda::getCurrentCUDAStream()),
        op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, bool causal, const c10::optional<at::Tensor>& key_padding_mask,
    const c10::optional<at::Tensor>& cu_seqlens, double scale) {
  const char* op = "flash_attention_backward";
  const auto shape = attention_shape(q_in, k_in, v_in, key_padding_mask, cu_seqlens, op);
  check_device(grad_in, q_in, "grad", op);
  check_device(out_in, q_in, "out", op);
  check_device(lse_in, q_in, "lse", op);
  TORCH_CHECK(grad_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), "tuneforge::", op,
              ": grad and out must be shaped like q ", q_in.sizes(), ", got ", grad_in.sizes(), " and ", out_in.sizes());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == shape.batch && lse_in.size(1) == shape.heads &&
                  lse_in.size(2) == shape.tq,
              "tuneforge::", op, ": lse must be (B, H, Tq) = (", shape.batch, ", ", shape.heads, ", ", shape.tq,
              "), got ", lse_in.sizes());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto q = q_in.contiguous(), k = heads_like_q(k_in, shape.heads), v = heads_like_q(v_in, shape.heads);
  const auto grad = grad_in.to(q.scalar_type()).contiguous();
  const auto lse = lse_in.to(at::kFloat).contiguous();
  const auto delta = (grad.to(at::kFloat) * out_in.to(at::kFloat)).sum(-1).contiguous();  // (B, H, Tq)
  at::Tensor mask;
  const bool* pad = padding(key_padding_mask, mask);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  check(cuda::attention_backward(dtype_of(q, op), q.data_ptr(), k.data_ptr(), v.data_ptr(), grad.data_ptr(),
                                 lse.data_ptr<float>(), delta.data_ptr<float>(), pad, dq.data_ptr(), dk.data_ptr(),
                                 dv.data_ptr(), shape, causal, static_cast<float>(scale),
                                 c10::cuda::getCurrentCUDAStream()),
        op);
  return {dq, sum_groups(dk, k_in), sum_groups(dv, v_in)};
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

// Devices first: every tensor the kernels read (and the cuBLAS base product's weight and bias) on x's device.
LoraInputs lora_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                       const at::Tensor& scalings, const at::Tensor& adapter_ids, const char* op) {
  TORCH_CHECK(x.is_cuda(), "tuneforge::", op, " (CUDA): x is on ", x.device());
  check_device(lora_a, x, "lora_a", op);
  check_device(lora_b, x, "lora_b", op);
  check_device(scalings, x, "scalings", op);
  check_device(adapter_ids, x, "adapter_ids", op);
  if (weight.has_value()) check_device(*weight, x, "weight", op);
  if (bias.has_value()) check_device(*bias, x, "bias", op);
  TORCH_CHECK(x.dim() >= 1, "tuneforge::", op, ": x must be (N, ..., in), got a scalar");
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
  in.s = scalings.to(at::kFloat).contiguous();  // on x's device (checked); the kernels read float32
  in.ids = adapter_ids.to(at::kLong).contiguous();
  return in;
}

}  // namespace

// Base product (cuBLAS), then every row's own update: shrink through its A, expand through its B.
at::Tensor multi_lora_linear_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                  const at::Tensor& lora_b, const at::Tensor& scalings, const at::Tensor& adapter_ids) {
  const auto in = lora_inputs(x, weight, bias, lora_a, lora_b, scalings, adapter_ids, "multi_lora_linear");
  const c10::cuda::CUDAGuard guard(x.device());
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
  bool needs[5];
  for (size_t i = 0; i < 5; ++i) needs[i] = needs_list.get(i);
  const auto in = lora_inputs(x, weight, c10::nullopt, lora_a, lora_b, scalings, adapter_ids,
                              "multi_lora_linear_backward");
  check_device(grad, x, "grad", "multi_lora_linear_backward");
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(grad.numel() == in.M * in.out, "tuneforge::multi_lora_linear_backward: grad ", grad.sizes(),
              " does not fit the output (", in.M, " rows of ", in.out, ")");
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
