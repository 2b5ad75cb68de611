// Fused linear + cross-entropy for ops.cpp (included there only): the loss of softmax(x W^T + b) against integer
// targets, and the gradients of x, W and b, without ever holding the (N, V) logits.
//
// Rows are taken in chunks sized so the chunk's logits stay near kChunkBytes (a vocabulary of 49,152 gives 256
// rows). Per chunk: logits = x_c W^T (+ b) by one GEMM into a reused buffer; one pass per row (rows side by side,
// at::parallel_for) computes max, log-sum-exp and the loss and, when gradients are wanted, overwrites the logits
// with their gradient (softmax - (1 - eps) onehot - eps / V, times the row's scale); then dx_c = G W and
// dW += G^T x_c (two more GEMMs). Total 6 N V C flops, as unfused, but memory is one chunk plus dW.
//
// Float32 and float64 inputs are processed in place in one buffer. Narrower inputs (bfloat16, float16) get their
// logits from a GEMM in their own dtype, as F.linear would, but the row pass and every accumulation (loss, dW,
// db) run in float32: the logits are copied into a float32 G, dW accumulates G^T x_c in float32, and dx_c = G W
// runs in the input dtype on a copy of G.
//
// The row pass is memory-light but exp-heavy (one exp per logit); the float32 version runs 8 lanes wide in a
// `#pragma GCC target("avx2,fma")` region chosen at run time (no -march=native, like attention_simd.h), with a
// polynomial exp; float64 (gradcheck) and CPUs without AVX2 take the portable loop with std::exp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace tuneforge {
namespace linear_ce {

// The chunk's logits in float32 stay within this: 256 rows at V = 49,152. What matters is that the chunk never
// grows with N, and that the dW += G^T x_c GEMM, which reads and writes all of dW once per chunk, gets enough rows:
// measured at N 2048, C 576 on 2 cores, the three chunked GEMMs took 1.46x the time of whole-matrix ones at 128
// rows, 1.24x at 170-192 and 1.14x at 256. Rows are a multiple of 16 (the GEMM's register blocking).
constexpr int64_t kChunkBytes = 48 << 20;

inline int64_t chunk_rows(int64_t V) {
  return std::clamp<int64_t>(kChunkBytes / (std::max<int64_t>(V, 1) * 4), 16, 1024) / 16 * 16;
}

enum class Reduction { None, Mean, Sum };

inline Reduction parse_reduction(c10::string_view r) {
  if (r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  TORCH_CHECK(r == "none", "tuneforge::linear_cross_entropy: reduction must be mean, sum or none, got '",
              std::string(r), "'");
  return Reduction::None;
}

// One row, in place: logits l (V,) -> its loss; when `grads`, l is overwritten with scale * dloss/dl. Three passes
// over the row (in L1/L2): max and sum; exp(l - max) written back and summed; the gradient. An ignored row: loss 0,
// gradient 0. This portable version serves float64 (gradcheck) and CPUs without AVX2.
template <typename A>
A row_portable(A* l, bool grads, int64_t V, int64_t t, A eps, A scale) {
  A m = -std::numeric_limits<A>::infinity(), total = 0;
  for (int64_t v = 0; v < V; ++v) {
    m = std::max(m, l[v]);
    total += l[v];  // for label smoothing: mean over the vocabulary of -log p = lse - mean(l)
  }
  const A target_logit = l[t];
  A s = 0;
  for (int64_t v = 0; v < V; ++v) {
    const A e = std::exp(l[v] - m);
    if (grads) l[v] = e;
    s += e;
  }
  const A lse = m + std::log(s);
  if (grads) {
    const A k = scale / s, off = scale * eps / static_cast<A>(V);
    for (int64_t v = 0; v < V; ++v) l[v] = l[v] * k - off;
    l[t] -= scale * (1 - eps);
  }
  return (1 - eps) * (lse - target_logit) + eps * (lse - total / static_cast<A>(V));
}

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

inline float hsum(__m256 x) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

inline float hmax(__m256 x) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}

// e^x for x <= 0 (the row's max is subtracted first): Cody-Waite reduction by ln 2, a degree-6 polynomial (Cephes
// expf, ~1 ulp), 2^n through the exponent bits. Below -87 the result is 0 (x is clamped so 2^n stays normal).
inline __m256 exp(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
  return _mm256_and_ps(e, _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GT_OQ));  // 0 where clamped
}

inline float scalar_exp(float x) {  // the same function on one value (row tails), so every element agrees
  return _mm_cvtss_f32(_mm256_castps256_ps128(exp(_mm256_set1_ps(x))));
}

// row_portable<float> with 8 lanes and two accumulators per pass.
inline float row(float* l, bool grads, int64_t V, int64_t t, float eps, float scale) {
  const int64_t V16 = V / 16 * 16, V8 = V / 8 * 8;
  __m256 m0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  __m256 t0 = _mm256_setzero_ps(), t1 = t0;
  for (int64_t v = 0; v < V16; v += 16) {
    const __m256 a = _mm256_loadu_ps(l + v), b = _mm256_loadu_ps(l + v + 8);
    m0 = _mm256_max_ps(m0, a), m1 = _mm256_max_ps(m1, b);
    t0 = _mm256_add_ps(t0, a), t1 = _mm256_add_ps(t1, b);
  }
  float m = hmax(_mm256_max_ps(m0, m1)), total = hsum(_mm256_add_ps(t0, t1));
  for (int64_t v = V16; v < V; ++v) m = std::max(m, l[v]), total += l[v];
  const float target_logit = l[t];
  const __m256 mv = _mm256_set1_ps(m);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  for (int64_t v = 0; v < V16; v += 16) {
    const __m256 a = exp(_mm256_sub_ps(_mm256_loadu_ps(l + v), mv));
    const __m256 b = exp(_mm256_sub_ps(_mm256_loadu_ps(l + v + 8), mv));
    if (grads) _mm256_storeu_ps(l + v, a), _mm256_storeu_ps(l + v + 8, b);
    s0 = _mm256_add_ps(s0, a), s1 = _mm256_add_ps(s1, b);
  }
  float s = hsum(_mm256_add_ps(s0, s1));
  for (int64_t v = V16; v < V; ++v) {
    const float e = scalar_exp(l[v] - m);
    if (grads) l[v] = e;
    s += e;
  }
  const float lse = m + std::log(s);
  if (grads) {
    const float k = scale / s, off = scale * eps / static_cast<float>(V);
    const __m256 kv = _mm256_set1_ps(k), offv = _mm256_set1_ps(off);
    for (int64_t v = 0; v < V8; v += 8) _mm256_storeu_ps(l + v, _mm256_fmsub_ps(_mm256_loadu_ps(l + v), kv, offv));
    for (int64_t v = V8; v < V; ++v) l[v] = l[v] * k - off;
    l[t] -= scale * (1 - eps);
  }
  return (1 - eps) * (lse - target_logit) + eps * (lse - total / static_cast<float>(V));
}

}  // namespace avx2
#pragma GCC pop_options
#endif

inline bool has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

// One row of type A (float or double), in place, see row_portable. Ignored rows: loss 0, gradient 0.
template <typename A>
A row(A* l, bool grads, int64_t V, int64_t t, int64_t ignore_index, A eps, A scale) {
  if (t == ignore_index) {
    if (grads) std::fill(l, l + V, A(0));
    return A(0);
  }
#if defined(__x86_64__) || defined(_M_X64)
  if constexpr (std::is_same_v<A, float>) {
    if (has_avx2()) return avx2::row(l, grads, V, t, eps, scale);
  }
#endif
  return row_portable<A>(l, grads, V, t, eps, scale);
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
  auto g = narrow ? at::empty({rows_max, V}, acc) : logits;  // the row pass's float32 copy, else in place
  const auto tgt = target.contiguous();
  const int64_t* tp = tgt.data_ptr<int64_t>();
  const auto rs = row_scale.defined() ? row_scale.to(acc_type).contiguous() : at::Tensor();
  for (int64_t r0 = 0; r0 < N; r0 += rows_max) {
    const int64_t rows = std::min(rows_max, N - r0);
    const auto xc = x.narrow(0, r0, rows);
    auto lc = logits.narrow(0, 0, rows), gc = g.narrow(0, 0, rows);
    if (bias.has_value()) at::addmm_out(lc, *bias, xc, w.t());
    else at::mm_out(lc, xc, w.t());
    if (narrow) gc.copy_(lc);
    AT_DISPATCH_FLOATING_TYPES(acc_type, "linear_cross_entropy", [&] {
      using A = scalar_t;
      A* gp = gc.data_ptr<A>();
      A* outp = losses.defined() ? losses.data_ptr<A>() + r0 : nullptr;
      const A* sp = rs.defined() ? rs.data_ptr<A>() + r0 : nullptr;
      at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t t = tp[r0 + i];
          TORCH_CHECK(t == ignore_index || (t >= 0 && t < V), "tuneforge::linear_cross_entropy: target ", t,
                      " at row ", r0 + i, " is outside [0, ", V, ") and is not ignore_index (", ignore_index, ")");
          const A s = sp ? sp[i] : static_cast<A>(scale);
          const A loss = row<A>(gp + i * V, grads, V, t, ignore_index, static_cast<A>(eps), s);
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
