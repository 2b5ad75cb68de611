// Fused linear + cross-entropy for ops.cpp (included there only): the loss of softmax(x W^T + b) against integer
// targets, and the gradients of x, W and b, without ever holding the (N, V) logits.
//
// Rows are taken in chunks sized so the chunk's logits stay near kChunkBytes (a vocabulary of 49,152 gives ~170
// rows). Per chunk: logits = x_c W^T (+ b) by one GEMM into a reused buffer; one pass per row (rows side by side,
// at::parallel_for) computes max, log-sum-exp and the loss and, when gradients are wanted, overwrites the logits
// with their gradient (softmax - (1 - eps) onehot - eps / V, times the row's scale); then dx_c = G W and
// dW += G^T x_c (two more GEMMs). Total 6 N V C flops, as unfused, but memory is one chunk plus dW.
//
// Float32 and float64 inputs are processed in place in one buffer. Narrower inputs (bfloat16, float16) get their
// logits from a GEMM in their own dtype, as F.linear would, but the row pass and every accumulation (loss, dW,
// db) run in float32: G is float32, dW accumulates G^T x_c in float32, and dx_c = G W runs in the input dtype on
// a copy of G.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace tuneforge {
namespace linear_ce {

// The chunk's logits in float32 stay within this (L2 is far smaller; what matters is that the chunk never grows
// with N, and that the dW += G^T x_c GEMM, which reads and writes all of dW once per chunk, gets enough rows).
constexpr int64_t kChunkBytes = 32 << 20;

inline int64_t chunk_rows(int64_t V) {
  return std::clamp<int64_t>(kChunkBytes / (std::max<int64_t>(V, 1) * 4), 16, 1024);
}

enum class Reduction { None, Mean, Sum };

inline Reduction parse_reduction(c10::string_view r) {
  if (r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  TORCH_CHECK(r == "none", "tuneforge::linear_cross_entropy: reduction must be mean, sum or none, got '",
              std::string(r), "'");
  return Reduction::None;
}

// One row: logits l (V,) of type T -> its loss; when g is not null, g (V,) of type A receives scale * dloss/dl
// (g may alias l when T == A: every read of l[v] happens before g[v] is written). An ignored row: loss 0, g 0.
template <typename T, typename A>
A row(const T* l, A* g, int64_t V, int64_t t, int64_t ignore_index, A eps, A scale) {
  if (t == ignore_index) {
    if (g) std::fill(g, g + V, A(0));
    return A(0);
  }
  A m = -std::numeric_limits<A>::infinity(), total = 0;
  for (int64_t v = 0; v < V; ++v) {
    const A x = static_cast<A>(l[v]);
    m = std::max(m, x);
    total += x;  // for label smoothing: mean over the vocabulary of -log p = lse - mean(l)
  }
  A s = 0;
  for (int64_t v = 0; v < V; ++v) s += std::exp(static_cast<A>(l[v]) - m);
  const A lse = m + std::log(s);
  const A target_logit = static_cast<A>(l[t]);
  const A loss = (1 - eps) * (lse - target_logit) + eps * (lse - total / static_cast<A>(V));
  if (g) {
    const A off = scale * eps / static_cast<A>(V);
    for (int64_t v = 0; v < V; ++v) g[v] = scale * std::exp(static_cast<A>(l[v]) - lse) - off;
    g[t] -= scale * (1 - eps);
  }
  return loss;
}

// The chunked sweep shared by forward and backward. `scale` is the constant factor of every row's gradient
// (forward of mean / sum) unless `row_scale` (N,) is defined (backward of reduction none: the upstream gradient of
// each row). Writes per-row losses into `losses` (N,) when defined. Returns (dx, dW, db) as asked by `needs`
// (empty tensors otherwise), dW and db accumulated in float32/float64 and converted at the end.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> sweep(
    const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const at::Tensor& target,
    int64_t ignore_index, double eps, double scale, const at::Tensor& row_scale, const bool needs[3],
    at::Tensor losses, int64_t chunk) {
  const int64_t N = x.size(0), C = x.size(1), V = w.size(0);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const bool narrow = acc_type != x.scalar_type();  // bf16 / fp16 in: float32 pass and accumulators
  const bool grads = needs[0] || needs[1] || needs[2];
  const auto acc = x.options().dtype(acc_type);
  at::Tensor dx = needs[0] ? at::empty({N, C}, x.options()) : at::Tensor();
  at::Tensor dw = needs[1] ? at::zeros({V, C}, acc) : at::Tensor();
  at::Tensor db = needs[2] ? at::zeros({V}, acc) : at::Tensor();
  const int64_t rows_max = std::min<int64_t>(chunk > 0 ? chunk : chunk_rows(V), std::max<int64_t>(N, 1));
  auto logits = at::empty({rows_max, V}, x.options());                           // (rows, V), reused
  auto g = (grads && narrow) ? at::empty({rows_max, V}, acc) : logits;            // in place unless narrow
  const auto tgt = target.contiguous();
  const int64_t* tp = tgt.data_ptr<int64_t>();
  const auto rs = row_scale.defined() ? row_scale.to(acc_type).contiguous() : at::Tensor();
  for (int64_t r0 = 0; r0 < N; r0 += rows_max) {
    const int64_t rows = std::min(rows_max, N - r0);
    const auto xc = x.narrow(0, r0, rows);
    auto lc = logits.narrow(0, 0, rows), gc = g.narrow(0, 0, rows);
    if (bias.has_value()) at::addmm_out(lc, *bias, xc, w.t());
    else at::mm_out(lc, xc, w.t());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "linear_cross_entropy", [&] {
      using A = at::opmath_type<scalar_t>;
      const scalar_t* lp = lc.data_ptr<scalar_t>();
      A* gp = grads ? gc.data_ptr<A>() : nullptr;
      A* outp = losses.defined() ? losses.data_ptr<A>() + r0 : nullptr;
      const A* sp = rs.defined() ? rs.data_ptr<A>() + r0 : nullptr;
      at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t t = tp[r0 + i];
          TORCH_CHECK(t == ignore_index || (t >= 0 && t < V), "tuneforge::linear_cross_entropy: target ", t,
                      " at row ", r0 + i, " is outside [0, ", V, ") and is not ignore_index (", ignore_index, ")");
          const A s = sp ? sp[i] : static_cast<A>(scale);
          const A loss = row<scalar_t, A>(lp + i * V, gp ? gp + i * V : nullptr, V, t, ignore_index,
                                          static_cast<A>(eps), s);
          if (outp) outp[i] = loss;
        }
      });
    });
    if (!grads) continue;
    if (needs[0]) {
      auto dxc = dx.narrow(0, r0, rows);
      at::mm_out(dxc, narrow ? gc.to(x.scalar_type()) : gc, w);                   // (rows, C)
    }
    if (needs[1]) dw.addmm_(gc.t(), narrow ? xc.to(acc_type) : xc);               // (V, C) += (V, rows)(rows, C)
    if (needs[2]) db.add_(gc.sum(0));
  }
  if (needs[1] && narrow) dw = dw.to(w.scalar_type());
  if (needs[2] && bias.has_value() && db.scalar_type() != bias->scalar_type()) db = db.to(bias->scalar_type());
  return {dx, dw, db};
}

inline void check(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& target) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "tuneforge::linear_cross_entropy: hidden "
              "(N, C) and weight (V, C), got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0) && target.scalar_type() == at::kLong,
              "tuneforge::linear_cross_entropy: target must be int64 (N,) = (", x.size(0), ",), got ",
              target.scalar_type(), " ", target.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "tuneforge::linear_cross_entropy: hidden and weight dtypes differ");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->scalar_type() == x.scalar_type(),
                "tuneforge::linear_cross_entropy: bias must be (V,) = (", w.size(0), ",) in hidden's dtype");
}

}  // namespace linear_ce

// Loss of reduction `reduction` (mean over non-ignored rows, 0 when there are none; sum; none: (N,)) in float32
// (float64 for float64 inputs), and for mean / sum the gradients of hidden, weight and bias as `needs` asks
// (empty tensors otherwise): computed here, where the logits are at hand, so the backward only scales them.
// Reduction none computes no gradient here (its backward needs each row's upstream gradient and recomputes).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, c10::string_view reduction,
    c10::List<bool> needs_list, int64_t chunk) {
  using namespace linear_ce;
  check(hidden, weight, bias, target);
  TORCH_CHECK(needs_list.size() == 3, "tuneforge::linear_cross_entropy: needs three flags (hidden, weight, bias)");
  const auto red = parse_reduction(reduction);
  const auto x = hidden.contiguous(), w = weight.contiguous();
  const auto acc_type = at::toOpMathType(x.scalar_type());
  bool needs[3];
  for (size_t i = 0; i < 3; ++i) needs[i] = red != Reduction::None && needs_list.get(i);
  needs[2] = needs[2] && bias.has_value();
  const auto tgt = target.contiguous();
  double scale = 1;
  if (red == Reduction::Mean) {  // the divisor: rows whose target is not ignored (F.cross_entropy's mean)
    const int64_t* tp = tgt.data_ptr<int64_t>();
    int64_t count = 0;
    for (int64_t i = 0; i < tgt.numel(); ++i) count += tp[i] != ignore_index;
    scale = 1.0 / static_cast<double>(std::max<int64_t>(count, 1));
  }
  auto losses = at::empty({x.size(0)}, x.options().dtype(acc_type));              // (N,)
  auto [dx, dw, db] = sweep(x, w, bias, tgt, ignore_index, label_smoothing, scale, at::Tensor(), needs, losses,
                            chunk);
  const auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : x.new_empty({0}); };  // never aliased
  at::Tensor loss = red == Reduction::None ? losses : losses.sum().mul_(scale);
  return {loss, or_empty(dx), or_empty(dw), or_empty(db)};
}

// Backward of reduction none: grad (N,) is each row's upstream gradient; the logits are recomputed per chunk.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cpu(
    const at::Tensor& grad, const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, c10::List<bool> needs_list,
    int64_t chunk) {
  using namespace linear_ce;
  check(hidden, weight, bias, target);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == hidden.size(0), "tuneforge::linear_cross_entropy_backward: grad "
              "must be (N,)");
  bool needs[3];
  for (size_t i = 0; i < 3; ++i) needs[i] = needs_list.get(i);
  needs[2] = needs[2] && bias.has_value();
  const auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : hidden.new_empty({0}); };
  if (!(needs[0] || needs[1] || needs[2])) return {or_empty({}), or_empty({}), or_empty({})};
  auto [dx, dw, db] = sweep(hidden.contiguous(), weight.contiguous(), bias, target, ignore_index, label_smoothing, 1,
                            grad, needs, at::Tensor(), chunk);
  return {or_empty(dx), or_empty(dw), or_empty(db)};
}

}  // namespace tuneforge
