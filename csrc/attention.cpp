// Flash attention on the CPU: tiled over queries, keys in chunks merged with an online softmax, only the
// log-sum-exp saved for a backward that recomputes the scores. Never a (T, T) matrix: each thread holds one
// (query tile x key chunk) block of scores.
//
// Layout: q (B, H, Tq, D), k and v (B, H, Tk, D), contiguous, float32 (other dtypes are converted by the caller).
// causal is bottom-right aligned: query i (absolute position Tk - Tq + i) sees keys 0 .. Tk - Tq + i.
// key_padding_mask (B, Tk) bool, true = a real key. A query that sees no key returns 0 and lse = -inf.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

namespace tuneforge {

namespace {

constexpr int64_t kQTile = 64;      // query rows per task
constexpr int64_t kKChunk = 1024;  // keys per block of scores (merged across chunks by the online softmax)
template <typename T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// Row-major C (m x n) = alpha op(A) op(B) + beta C on raw pointers. The tiles here are small (64..1024 wide), so
// the per-call cost of at::mm through the dispatcher shows; the BLAS that torch itself links (its Fortran
// sgemm_/dgemm_ entry points, found at run time) is called directly where it exists, at::addmm_out on views where
// not. float64 is there for gradcheck.
template <typename T>
using GemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*, const int*,
                        const T*, const int*, const T*, T*, const int*);

template <typename T>
GemmFn<T> blas_gemm() {
  static const GemmFn<T> fn =
      reinterpret_cast<GemmFn<T>>(dlsym(RTLD_DEFAULT, std::is_same<T, float>::value ? "sgemm_" : "dgemm_"));
  return fn;
}

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (GemmFn<T> fn = blas_gemm<T>()) {  // column-major BLAS computes C^T = op(B)^T op(A)^T
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LA = static_cast<int>(ldb), LB = static_cast<int>(lda), LC = static_cast<int>(ldc);
    fn(&ta, &tb, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto A = at::from_blob(const_cast<T*>(a), {trans_a ? k : m, trans_a ? m : k}, {lda, 1}, opts);
  auto B = at::from_blob(const_cast<T*>(b), {trans_b ? n : k, trans_b ? k : n}, {ldb, 1}, opts);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(C, C, trans_a ? A.t() : A, trans_b ? B.t() : B, beta, alpha);
}

// exp(x) for x <= 0-ish, written so the compiler vectorizes the loops that call it (no libm call): Cody-Waite
// range reduction x = n ln2 + r, a degree-6 polynomial for e^r (Cephes' coefficients, ~1 ulp), then 2^n through
// the exponent bits. Below -87 (and -inf: a masked score) it is exactly 0.
inline float exp_approx(float x) {
  const float xc = std::max(x, -87.f);
  const float n = std::nearbyint(xc * 1.44269504088896341f);
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.f ? 0.f : p * scale;
}

inline double exp_approx(double x) { return std::exp(x); }  // float64 is for gradcheck: exact, not fast

template <typename T>
T row_max(const T* row, int64_t n, T start) {
  T mx = start;
  for (int64_t j = 0; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
  return mx;
}

// row[j] = exp(row[j] - m); returns the sum.
template <typename T>
T exp_shift_sum(T* row, int64_t n, T m) {
  for (int64_t j = 0; j < n; ++j) row[j] = exp_approx(row[j] - m);
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += row[j];
  return sum;
}

// Set to -inf the scores a query may not see: causal band, then padding. s: (rows, cols) for queries
// q0.. and keys k0.., row stride ld.
template <typename T>
void mask_block(T* s, int64_t rows, int64_t cols, int64_t ld, int64_t q0, int64_t k0, int64_t offset,
                bool causal, const bool* pad) {
  for (int64_t i = 0; i < rows; ++i) {
    T* row = s + i * ld;
    if (causal) {
      const int64_t last = q0 + i + offset;  // the last key this query sees
      for (int64_t j = std::max<int64_t>(0, last + 1 - k0); j < cols; ++j) row[j] = neg_inf<T>();
    }
    if (pad != nullptr) {
      for (int64_t j = 0; j < cols; ++j) {
        if (!pad[k0 + j]) row[j] = neg_inf<T>();
      }
    }
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, bool causal,
                                                     const c10::optional<at::Tensor>& key_padding_mask, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "tuneforge::flash_attention: q, k, v (B, H, T, D)");
  const auto q = q_in.detach().contiguous(), k = k_in.detach().contiguous(), v = v_in.detach().contiguous();
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Tk = k.size(2);
  TORCH_CHECK(!causal || Tq <= Tk, "tuneforge::flash_attention: causal needs Tq <= Tk, got ", Tq, " > ", Tk);
  const auto mask = key_padding_mask.has_value() ? key_padding_mask->to(at::kBool).contiguous() : at::Tensor();
  auto out = at::zeros_like(q);
  at::Tensor lse = at::full({B, H, Tq}, neg_inf<T>(), q.options());
  // Raw pointers, not tensor indexing, inside the loop: at small sizes (the tiny model's T = 128) the per-task
  // cost of creating views showed next to the arithmetic.
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T *outp = out.data_ptr<T>(), *lsep = lse.data_ptr<T>();
  const bool* maskp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const int64_t offset = Tk - Tq, n_tiles = (Tq + kQTile - 1) / kQTile, width = std::min(Tk, kKChunk);
  at::parallel_for(0, B * H * n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(kQTile * width), acc(kQTile * D), m(kQTile), l(kQTile);  // this thread's block
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_tiles, q0 = (task % n_tiles) * kQTile, b = bh / H;
      const int64_t rows = std::min(kQTile, Tq - q0);
      const int64_t k_end = causal ? std::min(Tk, q0 + rows + offset) : Tk;
      const T* qt = qp + (bh * Tq + q0) * D;                             // (rows, D)
      const T *kb = kp + bh * Tk * D, *vb = vp + bh * Tk * D;            // (Tk, D)
      const bool* pad = maskp != nullptr ? maskp + b * Tk : nullptr;
      std::fill(m.begin(), m.end(), neg_inf<T>());
      std::fill(l.begin(), l.end(), T(0));
      T* ap = acc.data();
      std::fill(ap, ap + rows * D, T(0));
      for (int64_t k0 = 0; k0 < k_end; k0 += kKChunk) {
        const int64_t cols = std::min(kKChunk, k_end - k0), ld = width;
        T* sp = scores.data();
        gemm(false, true, rows, cols, D, T(scale), qt, D, kb + k0 * D, D, T(0), sp, ld);  // S = scale Q K^T
        mask_block(sp, rows, cols, ld, q0, k0, offset, causal, pad);
        for (int64_t i = 0; i < rows; ++i) {                             // online softmax, row by row
          T* row = sp + i * ld;
          const T mx = row_max(row, cols, m[i]);
          if (mx == neg_inf<T>()) {                                      // nothing visible yet in this row
            std::fill(row, row + cols, T(0));
            continue;
          }
          const T correction = m[i] == neg_inf<T>() ? T(0) : std::exp(m[i] - mx);
          l[i] = l[i] * correction + exp_shift_sum(row, cols, mx);
          m[i] = mx;
          if (correction != T(1)) {
            for (int64_t d = 0; d < D; ++d) ap[i * D + d] *= correction;
          }
        }
        gemm(false, false, rows, D, cols, T(1), sp, ld, vb + k0 * D, D, T(1), ap, D);  // (rows, D) += P V
      }
      T* op = outp + (bh * Tq + q0) * D;
      T* lp = lsep + bh * Tq + q0;
      for (int64_t i = 0; i < rows; ++i) {
        if (l[i] == T(0)) continue;                                      // saw no key: zeros, lse = -inf
        const T inv = T(1) / l[i];
        for (int64_t d = 0; d < D; ++d) op[i * D + d] = ap[i * D + d] * inv;
        lp[i] = m[i] + std::log(l[i]);
      }
    }
  });
  return {out, lse};
}

// dq, dk, dv from the scores recomputed block by block: P = exp(S - lse), dV += P^T dO, dP = dO V^T,
// dS = P (dP - rowsum(dO * O)), dQ = scale dS K, dK += scale dS^T Q. Parallel over (b, h): the key-side
// gradients of one head accumulate over its query tiles in one thread.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, bool causal, const c10::optional<at::Tensor>& key_padding_mask,
    double scale) {
  const auto q = q_in.detach().contiguous(), k = k_in.detach().contiguous(), v = v_in.detach().contiguous();
  const auto g = grad_in.detach().contiguous(), o = out_in.detach().contiguous(), lse = lse_in.detach().contiguous();
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Tk = k.size(2);
  const int64_t offset = Tk - Tq, width = std::min(Tk, kKChunk);
  const auto mask = key_padding_mask.has_value() ? key_padding_mask->to(at::kBool).contiguous() : at::Tensor();
  auto dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const auto delta = (g * o).sum(-1).contiguous();                       // (B, H, Tq)
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *gp = g.data_ptr<T>();
  const T *lsep = lse.data_ptr<T>(), *deltap = delta.data_ptr<T>();
  T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
  const bool* maskp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p_buf(kQTile * width), dp_buf(kQTile * width);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      const T *kb = kp + bh * Tk * D, *vb = vp + bh * Tk * D;
      T *dkb = dkp + bh * Tk * D, *dvb = dvp + bh * Tk * D;
      const bool* pad = maskp != nullptr ? maskp + b * Tk : nullptr;
      for (int64_t q0 = 0; q0 < Tq; q0 += kQTile) {
        const int64_t rows = std::min(kQTile, Tq - q0);
        const int64_t k_end = causal ? std::min(Tk, q0 + rows + offset) : Tk;
        const T *qt = qp + (bh * Tq + q0) * D, *gt = gp + (bh * Tq + q0) * D;  // (rows, D)
        T* dqt = dqp + (bh * Tq + q0) * D;
        const T *lp = lsep + bh * Tq + q0, *dl = deltap + bh * Tq + q0;
        for (int64_t k0 = 0; k0 < k_end; k0 += kKChunk) {
          const int64_t cols = std::min(kKChunk, k_end - k0), ld = width;
          T *pp = p_buf.data(), *dpp = dp_buf.data();
          const T *kc = kb + k0 * D, *vc = vb + k0 * D;
          gemm(false, true, rows, cols, D, T(scale), qt, D, kc, D, T(0), pp, ld);  // S
          mask_block(pp, rows, cols, ld, q0, k0, offset, causal, pad);
          for (int64_t i = 0; i < rows; ++i) {                           // P = exp(s - lse); masked: 0
            T* row = pp + i * ld;
            if (lp[i] == neg_inf<T>()) {
              std::fill(row, row + cols, T(0));
            } else {
              for (int64_t j = 0; j < cols; ++j) row[j] = exp_approx(row[j] - lp[i]);
            }
          }
          gemm(true, false, cols, D, rows, T(1), pp, ld, gt, D, T(1), dvb + k0 * D, D);  // dV += P^T dO
          gemm(false, true, rows, cols, D, T(1), gt, D, vc, D, T(0), dpp, ld);           // dP = dO V^T
          for (int64_t i = 0; i < rows; ++i) {                           // dS = P (dP - delta)
            T* drow = dpp + i * ld;
            const T* prow = pp + i * ld;
            for (int64_t j = 0; j < cols; ++j) drow[j] = prow[j] * (drow[j] - dl[i]);
          }
          gemm(false, false, rows, D, cols, T(scale), dpp, ld, kc, D, T(1), dqt, D);     // dQ += scale dS K
          gemm(true, false, cols, D, rows, T(scale), dpp, ld, qt, D, T(1), dkb + k0 * D, D);  // dK += scale dS^T Q
        }
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, bool causal,
                                                               const c10::optional<at::Tensor>& key_padding_mask,
                                                               double scale) {
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "tuneforge::flash_attention: q, k, v of one dtype");
  if (q.scalar_type() == at::kDouble) return attention_forward<double>(q, k, v, causal, key_padding_mask, scale);
  TORCH_CHECK(q.scalar_type() == at::kFloat, "tuneforge::flash_attention (CPU): float32 or float64, got ",
              q.scalar_type(), " (the Python face converts other dtypes)");
  return attention_forward<float>(q, k, v, causal, key_padding_mask, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, bool causal, const c10::optional<at::Tensor>& key_padding_mask, double scale) {
  if (q.scalar_type() == at::kDouble) {
    return attention_backward<double>(grad, q, k, v, out, lse, causal, key_padding_mask, scale);
  }
  return attention_backward<float>(grad, q, k, v, out, lse, causal, key_padding_mask, scale);
}

TORCH_LIBRARY_FRAGMENT(tuneforge, m) {
  m.def("flash_attention_forward(Tensor q, Tensor k, Tensor v, bool causal, Tensor? key_padding_mask, float scale) "
        "-> (Tensor, Tensor)");
  m.def("flash_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
        "Tensor? key_padding_mask, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tuneforge, CPU, m) {
  m.impl("flash_attention_forward", &flash_attention_forward_cpu);
  m.impl("flash_attention_backward", &flash_attention_backward_cpu);
}

}  // namespace tuneforge
