// tuneforge's CPU kernels, registered as torch.library ops in the namespace `tuneforge`.
//
// Every op has a pure-torch twin in core/kernels/reference.py (the fallback and the test oracle). Autograd and
// the fake (meta) implementations are registered from Python (core/kernels/native.py); this file declares the
// schemas once and gives the CPU implementations. Shapes are written (rows, features) after flattening the
// leading dimensions of x: M = tokens.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace tuneforge {

namespace {

at::Tensor rows_of(const at::Tensor& x) {  // (..., in) -> (M, in), a view when x is contiguous
  return x.reshape({-1, x.size(-1)});
}

int64_t per_row(const at::Tensor& x) {  // tokens in each row: the product of the dimensions between the first and last
  int64_t L = 1;
  for (int64_t d = 1; d + 1 < x.dim(); ++d) L *= x.size(d);
  return L;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t out_features) {
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  return shape;
}

}  // namespace

// x W^T + b + s (x A^T) B^T, accumulated into one output buffer: the base product writes it, the rank-r update
// is added by a second GEMM with alpha = s (no separate scale or add pass over the (M, out) output).
at::Tensor lora_linear_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                           double scaling) {
  TORCH_CHECK(lora_a.dim() == 2 && lora_b.dim() == 2, "tuneforge::lora_linear: lora_a (r, in), lora_b (out, r)");
  TORCH_CHECK(lora_a.size(1) == x.size(-1), "tuneforge::lora_linear: lora_a has ", lora_a.size(1),
              " inputs, x has ", x.size(-1));
  TORCH_CHECK(lora_b.size(1) == lora_a.size(0), "tuneforge::lora_linear: rank of lora_b (", lora_b.size(1),
              ") != rank of lora_a (", lora_a.size(0), ")");
  const auto x2 = rows_of(x);                     // (M, in)
  const auto low = at::mm(x2, lora_a.t());        // (M, r)
  at::Tensor out;                                 // (M, out)
  if (weight.has_value()) {
    const auto& w = *weight;
    TORCH_CHECK(w.size(0) == lora_b.size(0) && w.size(1) == x.size(-1), "tuneforge::lora_linear: weight is ",
                w.sizes(), ", lora_b is ", lora_b.sizes(), ", x has ", x.size(-1), " features");
    out = bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
    out.addmm_(low, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);
  } else {
    out = at::mm(low.mul(scaling), lora_b.t());  // scale the small (M, r) side, not the (M, out) result
  }
  return out.view(out_shape(x, lora_b.size(0)));
}

// Gradients of lora_linear. grad: (..., out). Returns (dx, dweight, dbias, dA, dB); each is an empty tensor when
// its `needs` flag is false (the frozen base weight of a LoRA run costs no (out, in) product).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, double scaling, c10::List<bool> needs_list) {
  TORCH_CHECK(needs_list.size() == 5, "tuneforge::lora_linear_backward: needs five flags (x, weight, bias, a, b)");
  bool needs[5];
  for (size_t i = 0; i < 5; ++i) needs[i] = needs_list.get(i);
  const auto g = rows_of(grad);                   // (M, out)
  const auto x2 = rows_of(x);                     // (M, in)
  at::Tensor dx, dw, db, da, dbb;
  const bool want_low_grad = needs[0] || needs[3];
  at::Tensor g_b;                                 // (M, r) = g B, shared by dx and dA
  if (want_low_grad) g_b = at::mm(g, lora_b);
  if (needs[0]) {
    if (weight.has_value()) {
      dx = at::mm(g, *weight);                    // (M, in)
      dx.addmm_(g_b, lora_a, /*beta=*/1, /*alpha=*/scaling);
    } else {
      dx = at::mm(g_b.mul(scaling), lora_a);
    }
    dx = dx.view(x.sizes());
  }
  if (needs[1] && weight.has_value()) dw = at::mm(g.t(), x2);  // (out, in)
  if (needs[2]) db = g.sum(0);
  if (needs[3]) da = at::mm(g_b.t(), x2).mul_(scaling);        // (r, in)
  if (needs[4]) dbb = at::mm(g.t(), at::mm(x2, lora_a.t())).mul_(scaling);  // (out, r)
  return {dx, dw, db, da, dbb};
}


namespace {

// The activation and its derivative, elementwise, by name ("gelu" is the exact erf form, as torch's default).
at::Tensor activate(const at::Tensor& z, c10::string_view act) {
  if (act == "gelu") return at::gelu(z);
  if (act == "relu") return at::relu(z);
  if (act == "silu") return at::silu(z);
  TORCH_CHECK(false, "tuneforge::bottleneck_adapter: unknown activation '", std::string(act), "' (gelu, relu, silu)");
}

at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& z, c10::string_view act) {
  if (act == "gelu") return at::gelu_backward(grad, z);
  if (act == "relu") return grad * (z > 0).to(grad.scalar_type());
  if (act == "silu") return at::silu_backward(grad, z);
  TORCH_CHECK(false, "tuneforge::bottleneck_adapter: unknown activation '", std::string(act), "'");
}

}  // namespace

// h + up(act(down(h))) with the residual and the up bias accumulated by the up GEMM itself (beta = 1 onto a
// buffer that already holds h + b_up): one pass over the (M, C) output instead of three. Also returns
// z = down(h), (M, m), small, which the backward needs (saved instead of recomputing a GEMM over h).
std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_cpu(const at::Tensor& h, const at::Tensor& w_down,
                                                          const at::Tensor& b_down, const at::Tensor& w_up,
                                                          const at::Tensor& b_up, c10::string_view activation,
                                                          bool residual) {
  TORCH_CHECK(w_down.dim() == 2 && w_up.dim() == 2 && w_down.size(1) == h.size(-1) && w_up.size(1) == w_down.size(0),
              "tuneforge::bottleneck_adapter: w_down (m, C), w_up (C, m) with C = h's last dimension");
  const auto h2 = rows_of(h);                                   // (M, C)
  const auto z = at::addmm(b_down, h2, w_down.t());             // (M, m)
  const auto a = activate(z, activation);                       // (M, m)
  at::Tensor out = residual ? h2.add(b_up) : b_up.expand({h2.size(0), w_up.size(0)}).contiguous();  // (M, C)
  out.addmm_(a, w_up.t());
  return {out.view(h.sizes()), z.view(out_shape(h, z.size(1)))};
}

// Gradients: (dh, dw_down, db_down, dw_up, db_up), from z saved by the forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_adapter_backward_cpu(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& z, const at::Tensor& w_down,
    const at::Tensor& w_up, c10::string_view activation, bool residual) {
  const auto g = rows_of(grad);                                 // (M, C)
  const auto h2 = rows_of(h);
  const auto z2 = rows_of(z);                                   // (M, m)
  const auto a = activate(z2, activation);                      // cheap next to the GEMMs
  const auto dz = activation_backward(at::mm(g, w_up), z2, activation);  // (M, m)
  // the residual's gradient plus the adapter's, written in one GEMM (beta = 1 onto a copy of g)
  at::Tensor dh = residual ? at::addmm(g, dz, w_down) : at::mm(dz, w_down);
  return {dh.view(h.sizes()), at::mm(dz.t(), h2), dz.sum(0), at::mm(g.t(), a), g.sum(0)};
}

namespace {

// The rows that have an adapter, grouped by adapter (one stable sort of the ids, no per-adapter search), and
// each adapter's segment (adapter, start, count) in that order.
struct Segments {
  at::Tensor order;                                       // (R,) row indices, adapter by adapter
  std::vector<std::tuple<int64_t, int64_t, int64_t>> spans;  // (adapter, start, count) into order
};

Segments segments(const at::Tensor& adapter_ids, int64_t n_adapters) {
  TORCH_CHECK(adapter_ids.dim() == 1 && adapter_ids.scalar_type() == at::kLong,
              "tuneforge::multi_lora_linear: adapter_ids must be (N,) int64");
  Segments seg;
  if (adapter_ids.numel() == 0) {
    seg.order = adapter_ids.new_empty({0});
    return seg;
  }
  const auto ids = adapter_ids.contiguous();
  TORCH_CHECK(ids.max().item<int64_t>() < n_adapters, "tuneforge::multi_lora_linear: an adapter id is >= the ",
              n_adapters, " adapters given");
  const auto counts = at::bincount(ids + 1, {}, n_adapters + 1).to(at::kCPU).contiguous();  // slot 0: rows without one
  const int64_t* c = counts.data_ptr<int64_t>();
  seg.order = at::argsort(ids, /*stable=*/true).slice(0, c[0]);  // drop the rows with id -1 (sorted first)
  int64_t start = 0;
  for (int64_t a = 0; a < n_adapters; ++a) {
    if (c[a + 1] > 0) seg.spans.emplace_back(a, start, c[a + 1]);
    start += c[a + 1];
  }
  return seg;
}

}  // namespace

// Base product for every row, then per adapter: gather its rows, two products, add them back. Each segment's
// buffers are small enough to stay in cache (gathering every row at once into one buffer measured slower).
at::Tensor multi_lora_linear_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                 const at::Tensor& lora_b, const at::Tensor& scalings, const at::Tensor& adapter_ids) {
  TORCH_CHECK(lora_a.dim() == 3 && lora_b.dim() == 3 && lora_a.size(0) == lora_b.size(0),
              "tuneforge::multi_lora_linear: lora_a (A, r, in), lora_b (A, out, r)");
  TORCH_CHECK(adapter_ids.size(0) == x.size(0), "tuneforge::multi_lora_linear: ", adapter_ids.size(0),
              " adapter ids for ", x.size(0), " rows");
  const int64_t N = x.size(0), L = per_row(x), in = x.size(-1), out_f = lora_b.size(1);
  const auto x3 = x.reshape({N, L, in});                        // (N, L, in)
  const auto x2 = x3.reshape({N * L, in});
  at::Tensor out = weight.has_value() ? (bias.has_value() ? at::addmm(*bias, x2, weight->t()) : at::mm(x2, weight->t()))
                                      : at::zeros({N * L, out_f}, x.options());
  auto out3 = out.view({N, L, out_f});
  const auto s = scalings.to(at::kCPU, at::kDouble).contiguous();  // read on the host
  const auto seg = segments(adapter_ids, lora_a.size(0));
  for (const auto& [a, start, n] : seg.spans) {
    const auto rows = seg.order.narrow(0, start, n);
    const auto xa = x3.index_select(0, rows).view({n * L, in});
    const auto low = at::mm(xa, lora_a[a].t()).mul_(s.data_ptr<double>()[a]);  // (n L, r), scaled while small
    out3.index_add_(0, rows, at::mm(low, lora_b[a].t()).view({n, L, out_f}));
  }
  return out.view(out_shape(x, out_f));
}

// Gradients (dx, dweight, dbias, dlora_a, dlora_b); `needs` as for lora_linear_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_lora_linear_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scalings, const at::Tensor& adapter_ids, c10::List<bool> needs_list) {
  bool needs[5];
  for (size_t i = 0; i < 5; ++i) needs[i] = needs_list.get(i);
  const int64_t N = x.size(0), L = per_row(x), in = x.size(-1), out_f = lora_b.size(1);
  const auto x3 = x.reshape({N, L, in});
  const auto g3 = grad.reshape({N, L, out_f});
  const auto g2 = g3.reshape({N * L, out_f});
  at::Tensor dx, dw, db, da, dbb;
  if (needs[0]) dx = weight.has_value() ? at::mm(g2, *weight) : at::zeros({N * L, in}, x.options());
  if (needs[1] && weight.has_value()) dw = at::mm(g2.t(), x3.reshape({N * L, in}));
  if (needs[2]) db = g2.sum(0);
  if (needs[3]) da = at::zeros_like(lora_a);
  if (needs[4]) dbb = at::zeros_like(lora_b);
  if (needs[0] || needs[3] || needs[4]) {
    auto dx3 = needs[0] ? dx.view({N, L, in}) : at::Tensor();
    const auto s = scalings.to(at::kCPU, at::kDouble).contiguous();  // read on the host
    const auto seg = segments(adapter_ids, lora_a.size(0));
    for (const auto& [a, start, n] : seg.spans) {
      const double sa = s.data_ptr<double>()[a];
      const auto rows = seg.order.narrow(0, start, n);
      const auto ga = g3.index_select(0, rows).view({n * L, out_f});  // (n L, out)
      const auto gb = at::mm(ga, lora_b[a]).mul_(sa);                 // (n L, r)
      if (needs[0]) dx3.index_add_(0, rows, at::mm(gb, lora_a[a]).view({n, L, in}));
      if (needs[3] || needs[4]) {
        const auto xa = x3.index_select(0, rows).view({n * L, in});
        if (needs[3]) {
          auto dst = da[a];
          at::mm_out(dst, gb.t(), xa);
        }
        if (needs[4]) {
          auto dst = dbb[a];
          at::mm_out(dst, ga.t(), at::mm(xa, lora_a[a].t()).mul_(sa));
        }
      }
    }
  }
  if (needs[0]) dx = dx.view(x.sizes());
  return {dx, dw, db, da, dbb};
}

// Each row's own adapter's scale * up(act(down(h))) (no residual), rows grouped by adapter like
// multi_lora_linear. Also returns z = down(h) of every row (zeros where a row has none) for the backward.
std::tuple<at::Tensor, at::Tensor> multi_bottleneck_adapter_cpu(
    const at::Tensor& h, const at::Tensor& w_down, const at::Tensor& b_down, const at::Tensor& w_up,
    const at::Tensor& b_up, const at::Tensor& scales, const at::Tensor& adapter_ids, c10::string_view activation) {
  TORCH_CHECK(w_down.dim() == 3 && w_up.dim() == 3 && w_down.size(2) == h.size(-1) && w_up.size(2) == w_down.size(1),
              "tuneforge::multi_bottleneck_adapter: w_down (A, m, C), w_up (A, C, m)");
  TORCH_CHECK(adapter_ids.size(0) == h.size(0), "tuneforge::multi_bottleneck_adapter: ", adapter_ids.size(0),
              " adapter ids for ", h.size(0), " rows");
  const int64_t N = h.size(0), L = per_row(h), C = h.size(-1), m = w_down.size(1);
  const auto h3 = h.reshape({N, L, C});
  auto out = at::zeros({N, L, C}, h.options());
  auto z = at::zeros({N, L, m}, h.options());
  const auto s = scales.to(at::kCPU, at::kDouble).contiguous();  // read on the host
  const auto seg = segments(adapter_ids, w_down.size(0));
  for (const auto& [a, start, n] : seg.spans) {
    const auto rows = seg.order.narrow(0, start, n);
    const auto hs = h3.index_select(0, rows).view({n * L, C});
    const auto za = at::addmm(b_down[a], hs, w_down[a].t());            // (n L, m)
    z.index_copy_(0, rows, za.view({n, L, m}));
    const auto ya = at::addmm(b_up[a], activate(za, activation), w_up[a].t()).mul_(s.data_ptr<double>()[a]);
    out.index_copy_(0, rows, ya.view({n, L, C}));
  }
  return {out.view(h.sizes()), z.view(out_shape(h, m))};
}

// Gradients (dh, dw_down, db_down, dw_up, db_up) from z saved by the forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_bottleneck_adapter_backward_cpu(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& z, const at::Tensor& w_down, const at::Tensor& w_up,
    const at::Tensor& scales, const at::Tensor& adapter_ids, c10::string_view activation) {
  const int64_t N = h.size(0), L = per_row(h), C = h.size(-1), m = w_down.size(1);
  const auto h3 = h.reshape({N, L, C});
  const auto g3 = grad.reshape({N, L, C});
  const auto z3 = z.reshape({N, L, m});
  auto dh = at::zeros({N, L, C}, h.options());
  auto dwd = at::zeros_like(w_down), dbd = at::zeros({w_down.size(0), m}, h.options());
  auto dwu = at::zeros_like(w_up), dbu = at::zeros({w_up.size(0), C}, h.options());
  const auto s = scales.to(at::kCPU, at::kDouble).contiguous();  // read on the host
  const auto seg = segments(adapter_ids, w_down.size(0));
  for (const auto& [a, start, n] : seg.spans) {
    const auto rows = seg.order.narrow(0, start, n);
    const auto ga = g3.index_select(0, rows).view({n * L, C}).mul(s.data_ptr<double>()[a]);  // scaled gradient
    const auto za = z3.index_select(0, rows).view({n * L, m});
    const auto ha = h3.index_select(0, rows).view({n * L, C});
    const auto dz = activation_backward(at::mm(ga, w_up[a]), za, activation);  // (n L, m)
    auto dst_wu = dwu[a];
    at::mm_out(dst_wu, ga.t(), activate(za, activation));
    dbu[a].copy_(ga.sum(0));
    auto dst_wd = dwd[a];
    at::mm_out(dst_wd, dz.t(), ha);
    dbd[a].copy_(dz.sum(0));
    dh.index_copy_(0, rows, at::mm(dz, w_down[a]).view({n, L, C}));
  }
  return {dh.view(h.sizes()), dwd, dbd, dwu, dbu};
}

TORCH_LIBRARY(tuneforge, m) {
  m.def("lora_linear(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling) -> Tensor");
  m.def("lora_linear_backward(Tensor grad, Tensor x, Tensor? weight, Tensor lora_a, Tensor lora_b, float scaling, "
        "bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("multi_lora_linear(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor scalings, "
        "Tensor adapter_ids) -> Tensor");
  m.def("multi_lora_linear_backward(Tensor grad, Tensor x, Tensor? weight, Tensor lora_a, Tensor lora_b, "
        "Tensor scalings, Tensor adapter_ids, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("multi_bottleneck_adapter(Tensor h, Tensor w_down, Tensor b_down, Tensor w_up, Tensor b_up, Tensor scales, "
        "Tensor adapter_ids, str activation) -> (Tensor, Tensor)");
  m.def("multi_bottleneck_adapter_backward(Tensor grad, Tensor h, Tensor z, Tensor w_down, Tensor w_up, "
        "Tensor scales, Tensor adapter_ids, str activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("bottleneck_adapter(Tensor h, Tensor w_down, Tensor b_down, Tensor w_up, Tensor b_up, str activation, "
        "bool residual) -> (Tensor, Tensor)");
  m.def("bottleneck_adapter_backward(Tensor grad, Tensor h, Tensor z, Tensor w_down, Tensor w_up, "
        "str activation, bool residual) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tuneforge, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
  m.impl("multi_lora_linear", &multi_lora_linear_cpu);
  m.impl("multi_lora_linear_backward", &multi_lora_linear_backward_cpu);
  m.impl("multi_bottleneck_adapter", &multi_bottleneck_adapter_cpu);
  m.impl("multi_bottleneck_adapter_backward", &multi_bottleneck_adapter_backward_cpu);
  m.impl("bottleneck_adapter", &bottleneck_adapter_cpu);
  m.impl("bottleneck_adapter_backward", &bottleneck_adapter_backward_cpu);
}

// These compositions are ATen calls only, so they serve CUDA tensors as they are (their cost is the GEMMs, which
// cuBLAS runs); flash attention and multi_lora_linear have CUDA kernels of their own (csrc/cuda/ops_cuda.cpp).
TORCH_LIBRARY_IMPL(tuneforge, CUDA, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
  m.impl("multi_bottleneck_adapter", &multi_bottleneck_adapter_cpu);
  m.impl("multi_bottleneck_adapter_backward", &multi_bottleneck_adapter_backward_cpu);
  m.impl("bottleneck_adapter", &bottleneck_adapter_cpu);
  m.impl("bottleneck_adapter_backward", &bottleneck_adapter_backward_cpu);
}

}  // namespace tuneforge
