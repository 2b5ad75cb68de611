// tuneforge's CPU kernels, registered as torch.library ops in the namespace `tuneforge`.
//
// Every op has a pure-torch twin in core/kernels/reference.py (the fallback and the test oracle). Autograd and
// the fake (meta) implementations are registered from Python (core/kernels/native.py); this file declares the
// schemas once and gives the CPU implementations. Shapes are written (rows, features) after flattening the
// leading dimensions of x: M = tokens.
//
// The LoRA and adapter ops run over chunks of rows as tasks (adapter_rows.h says why and how). The fused linear +
// cross-entropy (linear_ce.h) runs over chunks of rows one after the other, each with multithreaded GEMMs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "adapter_rows.h"
#include "linear_ce.h"

namespace tuneforge {

using namespace tasks;  // chunks, tasks, adapter pieces and row copies (adapter_rows.h)

// x W^T + b + s (x A^T) B^T, per chunk of rows: the base product writes the chunk, the rank-r update is added by a
// second GEMM with alpha = s (no separate scale or add pass over the (M, out) output).
at::Tensor lora_linear_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                           double scaling) {
  TORCH_CHECK(lora_a.dim() == 2 && lora_b.dim() == 2, "tuneforge::lora_linear: lora_a (r, in), lora_b (out, r)");
  TORCH_CHECK(lora_a.size(1) == x.size(-1), "tuneforge::lora_linear: lora_a has ", lora_a.size(1),
              " inputs, x has ", x.size(-1));
  TORCH_CHECK(lora_b.size(1) == lora_a.size(0), "tuneforge::lora_linear: rank of lora_b (", lora_b.size(1),
              ") != rank of lora_a (", lora_a.size(0), ")");
  if (weight.has_value())
    TORCH_CHECK(weight->size(0) == lora_b.size(0) && weight->size(1) == x.size(-1), "tuneforge::lora_linear: weight "
                "is ", weight->sizes(), ", lora_b is ", lora_b.sizes(), ", x has ", x.size(-1), " features");
  const auto x2 = rows_of(x);                     // (M, in)
  const int64_t M = x2.size(0);
  auto out = at::empty({M, lora_b.size(0)}, x.options());  // (M, out)
  const int64_t n = chunks_for(x, M);
  for_each_task(n, [&](int64_t i) {
    const auto [r0, rows] = chunk(i, n, M);
    const auto xc = x2.narrow(0, r0, rows);
    auto oc = out.narrow(0, r0, rows);
    const auto low = at::mm(xc, lora_a.t());    // (rows, r)
    if (weight.has_value()) {
      if (bias.has_value()) at::addmm_out(oc, *bias, xc, weight->t());
      else at::mm_out(oc, xc, weight->t());
      oc.addmm_(low, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);
    } else {
      at::mm_out(oc, low.mul_(scaling), lora_b.t());  // scale the small (rows, r) side, not the output
    }
  });
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
  const int64_t M = g.size(0), r = lora_a.size(0);
  const int64_t n = chunks_for(x, M);
  at::Tensor dx, dw, db, da, dbb;
  if (needs[1] && weight.has_value()) dw = at::mm(g.t(), x2);  // (out, in): one call over every row
  if (needs[0]) dx = at::empty(x2.sizes(), x.options());
  const auto pdb = needs[2] ? at::empty({n, g.size(1)}, g.options()) : at::Tensor();  // per-chunk partials
  const auto pda = needs[3] ? at::empty({n, r, x2.size(1)}, x.options()) : at::Tensor();
  const auto pdbb = needs[4] ? at::empty({n, r, g.size(1)}, x.options()) : at::Tensor();  // dB^T partials
  for_each_task(n, [&](int64_t i) {
    const auto [r0, rows] = chunk(i, n, M);
    const auto gc = g.narrow(0, r0, rows), xc = x2.narrow(0, r0, rows);
    at::Tensor gbs;                               // (rows, r) = s g B, shared by dx and dA
    if (needs[0] || needs[3]) gbs = at::mm(gc, lora_b).mul_(scaling);
    if (needs[0]) {
      auto dxc = dx.narrow(0, r0, rows);
      if (weight.has_value()) {
        at::mm_out(dxc, gc, *weight);
        dxc.addmm_(gbs, lora_a);
      } else {
        at::mm_out(dxc, gbs, lora_a);
      }
    }
    if (needs[2]) {
      auto dst = pdb[i];
      at::sum_out(dst, gc, 0);
    }
    if (needs[3]) {
      auto dst = pda[i];
      at::mm_out(dst, gbs.t(), xc);               // (r, in)
    }
    if (needs[4]) {
      auto dst = pdbb[i];  // (r, out) = (s x A^T)^T g: this orientation runs ~1.6x faster than g^T (s x A^T)
      at::mm_out(dst, at::mm(xc, lora_a.t()).mul_(scaling).t(), gc);
    }
  });
  if (needs[0]) dx = dx.view(x.sizes());
  if (needs[2]) db = total(pdb);
  if (needs[3]) da = total(pda);
  if (needs[4]) dbb = total(pdbb).t().contiguous();  // (out, r)
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

// h + up(act(down(h))) per chunk of rows, with the residual and the up bias accumulated by the up GEMM itself (beta
// = 1 onto the chunk of the output that already holds h + b_up): one pass over the (M, C) output instead of three,
// and the chunk of h read from cache the second time. Also returns z = down(h), (M, m), small, which the backward
// needs (saved instead of recomputing a GEMM over h).
std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_cpu(const at::Tensor& h, const at::Tensor& w_down,
                                                          const at::Tensor& b_down, const at::Tensor& w_up,
                                                          const at::Tensor& b_up, c10::string_view activation,
                                                          bool residual) {
  TORCH_CHECK(w_down.dim() == 2 && w_up.dim() == 2 && w_down.size(1) == h.size(-1) && w_up.size(1) == w_down.size(0),
              "tuneforge::bottleneck_adapter: w_down (m, C), w_up (C, m) with C = h's last dimension");
  activate(at::zeros({0}, h.options()), activation);  // an unknown name fails here, before any task runs
  const auto h2 = rows_of(h);                                   // (M, C)
  const int64_t M = h2.size(0);
  auto out = at::empty({M, w_up.size(0)}, h.options());        // (M, C)
  auto z = at::empty({M, w_down.size(0)}, h.options());         // (M, m)
  const int64_t n = chunks_for(h, M);
  for_each_task(n, [&](int64_t i) {
    const auto [r0, rows] = chunk(i, n, M);
    const auto hc = h2.narrow(0, r0, rows);
    auto zc = z.narrow(0, r0, rows), oc = out.narrow(0, r0, rows);
    at::addmm_out(zc, b_down, hc, w_down.t());
    if (residual) at::add_out(oc, hc, b_up);
    else oc.copy_(b_up.expand_as(oc));
    oc.addmm_(activate(zc, activation), w_up.t());
  });
  return {out.view(h.sizes()), z.view(out_shape(h, z.size(1)))};
}

// Gradients: (dh, dw_down, db_down, dw_up, db_up), from z saved by the forward. Per chunk: dz from g W_up, dh with
// the residual's g as the GEMM's starting value, and the chunk's partial weight gradients while g, h and a are in
// cache.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_adapter_backward_cpu(
    const at::Tensor& grad, const at::Tensor& h, const at::Tensor& z, const at::Tensor& w_down,
    const at::Tensor& w_up, c10::string_view activation, bool residual) {
  const auto g = rows_of(grad);                                 // (M, C)
  const auto h2 = rows_of(h);
  const auto z2 = rows_of(z);                                   // (M, m)
  const int64_t M = g.size(0), C = g.size(1), m = z2.size(1);
  const int64_t n = chunks_for(h, M);
  auto dh = at::empty({M, h2.size(1)}, h.options());
  auto pwd = at::empty({n, m, h2.size(1)}, h.options()), pbd = at::empty({n, m}, h.options());  // partials
  auto pwu = at::empty({n, m, C}, h.options()), pbu = at::empty({n, C}, h.options());  // dW_up^T partials
  for_each_task(n, [&](int64_t i) {
    const auto [r0, rows] = chunk(i, n, M);
    const auto gc = g.narrow(0, r0, rows), hc = h2.narrow(0, r0, rows), zc = z2.narrow(0, r0, rows);
    const auto dz = activation_backward(at::mm(gc, w_up), zc, activation);  // (rows, m)
    auto dhc = dh.narrow(0, r0, rows);
    if (residual) {
      dhc.copy_(gc);
      dhc.addmm_(dz, w_down);
    } else {
      at::mm_out(dhc, dz, w_down);
    }
    auto wu = pwu[i], bu = pbu[i], wd = pwd[i], bd = pbd[i];
    at::mm_out(wu, activate(zc, activation).t(), gc);           // (m, C): ~1.15x faster than g^T a (C, m)
    at::sum_out(bu, gc, 0);
    at::mm_out(wd, dz.t(), hc);                                  // (m, C)
    at::sum_out(bd, dz, 0);
  });
  return {dh.view(h.sizes()), total(pwd), total(pbd), total(pwu).t().contiguous(), total(pbu)};
}


// Base product for every row (one BLAS call), then per piece of one adapter's rows: gather them, two products,
// write them back (rows are disjoint, so pieces run side by side). With the base product the piece's output rows
// are the second GEMM's starting value (beta = 1); without it they are written once, and rows with no adapter zeroed.
at::Tensor multi_lora_linear_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                 const at::Tensor& lora_b, const at::Tensor& scalings, const at::Tensor& adapter_ids) {
  TORCH_CHECK(lora_a.dim() == 3 && lora_b.dim() == 3 && lora_a.size(0) == lora_b.size(0),
              "tuneforge::multi_lora_linear: lora_a (A, r, in), lora_b (A, out, r)");
  TORCH_CHECK(adapter_ids.size(0) == x.size(0), "tuneforge::multi_lora_linear: ", adapter_ids.size(0),
              " adapter ids for ", x.size(0), " rows");
  const int64_t N = x.size(0), L = per_row(x), in = x.size(-1), out_f = lora_b.size(1);
  const auto x3 = x.reshape({N, L * in}).contiguous();         // (N, L in): a row's tokens side by side
  const auto x2 = x3.view({N * L, in});
  at::Tensor out = weight.has_value() ? (bias.has_value() ? at::addmm(*bias, x2, weight->t()) : at::mm(x2, weight->t()))
                                      : at::empty({N * L, out_f}, x.options());
  auto out3 = out.view({N, L * out_f});
  const auto s = scalings.to(at::kCPU, at::kDouble).contiguous();  // read on the host
  const double* sp = s.data_ptr<double>();
  const auto p = pieces(adapter_ids, lora_a.size(0), piece_rows(x, N, L));
  const int64_t* order = p.order.data_ptr<int64_t>();
  if (!weight.has_value()) zero_rows(order, p.unused, out3);  // rows without an adapter
  for_each_task(static_cast<int64_t>(p.adapter.size()), [&](int64_t t) {
    const int64_t a = p.adapter[t], n = p.count[t];
    const int64_t* rows = order + p.start[t];
    auto xa = at::empty({n * L, in}, x.options());
    gather(x3, rows, n, xa);
    const auto low = at::mm(xa, lora_a[a].t()).mul_(sp[a]);   // (n L, r), scaled while small
    auto ya = at::empty({n * L, out_f}, x.options());
    if (weight.has_value()) {
      gather(out3, rows, n, ya);
      ya.addmm_(low, lora_b[a].t());
    } else {
      at::mm_out(ya, low, lora_b[a].t());
    }
    scatter(ya, rows, n, out3);
  });
  return out.view(out_shape(x, out_f));
}

// Gradients (dx, dweight, dbias, dlora_a, dlora_b); `needs` as for lora_linear_backward. dA and dB of an adapter are
// summed from its pieces' partials.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_lora_linear_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& scalings, const at::Tensor& adapter_ids, c10::List<bool> needs_list) {
  bool needs[5];
  for (size_t i = 0; i < 5; ++i) needs[i] = needs_list.get(i);
  const int64_t N = x.size(0), L = per_row(x), in = x.size(-1), out_f = lora_b.size(1), r = lora_a.size(1);
  const auto x3 = x.reshape({N, L * in}).contiguous();
  const auto g3 = grad.reshape({N, L * out_f}).contiguous();
  const auto g2 = g3.view({N * L, out_f});
  at::Tensor dx, dw, db, da, dbb;
  if (needs[0]) dx = weight.has_value() ? at::mm(g2, *weight) : at::empty({N * L, in}, x.options());
  if (needs[1] && weight.has_value()) dw = at::mm(g2.t(), x3.view({N * L, in}));
  if (needs[2]) db = g2.sum(0);
  if (!(needs[0] || needs[3] || needs[4])) return {dx, dw, db, da, dbb};
  const auto s = scalings.to(at::kCPU, at::kDouble).contiguous();  // read on the host
  const double* sp = s.data_ptr<double>();
  const auto p = pieces(adapter_ids, lora_a.size(0), piece_rows(x, N, L));
  const int64_t* order = p.order.data_ptr<int64_t>();
  const int64_t n_pieces = static_cast<int64_t>(p.adapter.size());
  auto dx3 = needs[0] ? dx.view({N, L * in}) : at::Tensor();
  if (needs[0] && !weight.has_value()) zero_rows(order, p.unused, dx3);
  const auto pda = needs[3] ? at::empty({n_pieces, r, in}, x.options()) : at::Tensor();
  const auto pdb = needs[4] ? at::empty({n_pieces, r, out_f}, x.options()) : at::Tensor();  // dB^T partials
  for_each_task(n_pieces, [&](int64_t t) {
    const int64_t a = p.adapter[t], n = p.count[t];
    const int64_t* rows = order + p.start[t];
    auto ga = at::empty({n * L, out_f}, x.options());
    gather(g3, rows, n, ga);
    const auto gb = at::mm(ga, lora_b[a]).mul_(sp[a]);         // (n L, r)
    if (needs[0]) {
      auto dxa = at::empty({n * L, in}, x.options());
      if (weight.has_value()) {
        gather(dx3, rows, n, dxa);
        dxa.addmm_(gb, lora_a[a]);
      } else {
        at::mm_out(dxa, gb, lora_a[a]);
      }
      scatter(dxa, rows, n, dx3);
    }
    if (!(needs[3] || needs[4])) return;
    auto xa = at::empty({n * L, in}, x.options());
    gather(x3, rows, n, xa);
    if (needs[3]) {
      auto dst = pda[t];
      at::mm_out(dst, gb.t(), xa);                              // (r, in)
    }
    if (needs[4]) {
      auto dst = pdb[t];  // (r, out): the faster orientation, as in lora_linear_backward
      at::mm_out(dst, at::mm(xa, lora_a[a].t()).mul_(sp[a]).t(), ga);
    }
  });
  if (needs[3]) da = at::empty_like(lora_a);
  if (needs[4]) dbb = at::empty_like(lora_b);
  for (int64_t a = 0; a < lora_a.size(0); ++a) {  // each adapter: the sum of its pieces, zeros without rows
    const int64_t k = p.n_pieces[a];
    if (needs[3]) k ? (void)da[a].copy_(total(pda.narrow(0, p.first[a], k))) : (void)da[a].zero_();
    if (needs[4]) k ? (void)dbb[a].copy_(total(pdb.narrow(0, p.first[a], k)).t()) : (void)dbb[a].zero_();
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
  const auto p = pieces(adapter_ids, w_down.size(0), std::max<int64_t>(N, 1));  // one piece per adapter
  const auto order = p.order.to(h.device());
  for (size_t t = 0; t < p.adapter.size(); ++t) {
    const int64_t a = p.adapter[t], n = p.count[t];
    const auto rows = order.narrow(0, p.start[t], n);
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
  const auto p = pieces(adapter_ids, w_down.size(0), std::max<int64_t>(N, 1));  // one piece per adapter
  const auto order = p.order.to(h.device());
  for (size_t t = 0; t < p.adapter.size(); ++t) {
    const int64_t a = p.adapter[t], n = p.count[t];
    const auto rows = order.narrow(0, p.start[t], n);
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
  m.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, int ignore_index, "
        "float label_smoothing, str reduction, bool[] needs, int chunk) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_cross_entropy_backward(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
        "int ignore_index, float label_smoothing, bool[] needs, int chunk) -> (Tensor, Tensor, Tensor)");
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
  m.impl("linear_cross_entropy", &linear_cross_entropy_cpu);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_cpu);
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
