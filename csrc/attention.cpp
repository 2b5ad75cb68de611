// Flash attention on the CPU: register-tiled micro-kernels (attention_isa.h, one source compiled per instruction
// set and chosen at run time: attention_simd.h); keys and values packed once per (batch, kv head); query tiles of
// 48 rows against key blocks of 256 (L2-sized) with the scale folded into the queries, masking only on blocks that
// cross a row's visible interval, and an online softmax; a FlashAttention-2-order backward (key blocks outer, dK
// and dV held in cache); work handed out dynamically, so a thread that another process delays holds up one tile,
// not a static share. Only the log-sum-exp is saved. Decoding (a few query rows per kv head) reads the KV cache in
// place, strided, without packing.
//
// Layout: q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with Hkv dividing H (grouped-query attention), any strides with the
// last dimension contiguous (a KV cache's filled slice is read in place). float32 at speed, float64 (exact exp2)
// for gradcheck. Which keys a query sees is an interval per row: causal (bottom-right aligned: query i sits at
// Tk - Tq + i), cut to its document when cu_seqlens packs several along T, then a key padding mask (B, Tk) on top.
// A query that sees no key returns 0 and lse = -inf.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <memory>
#include <thread>
#include <cstring>
#include <tuple>
#include <vector>

#include "attention_simd.h"

namespace tuneforge {
namespace attn {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Run work(i, scratch) for i in [0, n) in ONE parallel region on torch's threads, each thread taking the next job
// when it finishes one: a thread that the OS deschedules (another process on the core) delays one job, not a fixed
// share, and there is no barrier between phases to wait at. Jobs [0, n_prep) prepare shared inputs (packing) and
// mark them ready; later jobs wait (yielding) for what they read. Jobs are claimed in order, so every prep job a
// compute job waits on is already running on another thread: nothing can deadlock.
struct Ready {
  explicit Ready(int64_t n) : flags(new std::atomic<int>[static_cast<size_t>(std::max<int64_t>(n, 1))]) {
    for (int64_t i = 0; i < n; ++i) flags[i].store(0, std::memory_order_relaxed);
  }
  void done(int64_t i) { flags[i].store(1, std::memory_order_release); }
  void wait(int64_t i) const {
    while (flags[i].load(std::memory_order_acquire) == 0) std::this_thread::yield();
  }
  std::unique_ptr<std::atomic<int>[]> flags;
};

// Below this many multiply-adds per thread a parallel region costs more than it saves: waking a thread is
// microseconds, more when another process holds the core, and one decode step of a small model is ~50K.
constexpr int64_t kMinWorkPerThread = 1 << 18;

template <typename T, typename F>
void dynamic_for(int64_t n, int64_t scratch, int64_t macs, const F& work) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t by_work = std::max<int64_t>(1, macs / kMinWorkPerThread);
  const int64_t threads = std::max<int64_t>(1, std::min({static_cast<int64_t>(at::get_num_threads()), n, by_work}));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<T> buf(static_cast<size_t>(std::max<int64_t>(scratch, 1)));
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) work(i, buf.data());
  });
}

struct Problem {
  int64_t B, H, Hkv, G, Tq, Tk, D;
  at::Tensor q, k, v;   // last dimension contiguous
  at::Tensor lo, hi;    // (B, Tq) int64: keys [lo, hi) each query row may see (before padding)
  at::Tensor mask;      // (B, Tk) bool or undefined
};

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Shapes, dtypes, devices, then each row's interval: [0, Tk), cut by causality and by its document.
Problem problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "tuneforge::flash_attention: q, k, v must be (B, H, T, D)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "tuneforge::flash_attention (CPU kernel): q, k, v must be CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "tuneforge::flash_attention: q, k, v of one dtype");
  Problem p;
  p.B = q.size(0), p.H = q.size(1), p.Tq = q.size(2), p.D = q.size(3), p.Hkv = k.size(1), p.Tk = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == p.B && k.size(3) == p.D && p.Hkv > 0 && p.H % p.Hkv == 0,
              "tuneforge::flash_attention: k, v must be (B, Hkv, Tk, D) with Hkv dividing H; got q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(!causal || p.Tq <= p.Tk, "tuneforge::flash_attention: causal needs Tq <= Tk, got ", p.Tq, " > ", p.Tk);
  p.G = p.H / p.Hkv;
  p.q = last_dim_contiguous(q), p.k = last_dim_contiguous(k), p.v = last_dim_contiguous(v);
  if (key_padding_mask.has_value()) {
    const auto& m = *key_padding_mask;
    TORCH_CHECK(m.device().is_cpu() && m.dim() == 2 && m.size(0) == p.B && m.size(1) == p.Tk,
                "tuneforge::flash_attention: key_padding_mask must be a CPU (B, Tk) = (", p.B, ", ", p.Tk,
                ") tensor, got ", m.sizes(), " on ", m.device());
    // read in place when it already is bool rows with unit stride (generate passes a slice of a wider mask)
    p.mask = m.scalar_type() == at::kBool && m.stride(1) == 1 ? m : m.to(at::kBool).contiguous();
  }
  p.lo = at::zeros({p.B, p.Tq}, at::kLong);
  p.hi = at::empty({p.B, p.Tq}, at::kLong);
  int64_t *lo = p.lo.data_ptr<int64_t>(), *hi = p.hi.data_ptr<int64_t>();
  const int64_t offset = p.Tk - p.Tq;
  for (int64_t t = 0; t < p.Tq; ++t) hi[t] = causal ? std::max<int64_t>(0, std::min(p.Tk, t + offset + 1)) : p.Tk;
  for (int64_t b = 1; b < p.B; ++b) std::copy(hi, hi + p.Tq, hi + b * p.Tq);
  if (cu_seqlens.has_value()) {
    const auto cu = cu_seqlens->to(at::kLong).contiguous();
    TORCH_CHECK(cu.device().is_cpu() && p.Tq == p.Tk && (cu.dim() == 1 || (cu.dim() == 2 && cu.size(0) == p.B)) &&
                    cu.size(-1) >= 2,
                "tuneforge::flash_attention: cu_seqlens must be a CPU (S + 1,) or (B, S + 1) tensor with Tq == Tk, "
                "got ", cu.sizes(), " with Tq ", p.Tq, ", Tk ", p.Tk);
    const int64_t S = cu.size(-1) - 1;
    for (int64_t b = 0; b < p.B; ++b) {
      const int64_t* c = cu.data_ptr<int64_t>() + (cu.dim() == 2 ? b * (S + 1) : 0);
      TORCH_CHECK(c[0] == 0 && c[S] <= p.Tk, "tuneforge::flash_attention: cu_seqlens must start at 0 and end at "
                  "most at T = ", p.Tk, "; row ", b, " runs ", c[0], " .. ", c[S]);
      for (int64_t s = 0; s < S; ++s) {
        TORCH_CHECK(c[s + 1] >= c[s], "tuneforge::flash_attention: cu_seqlens must never decrease (row ", b, ")");
        for (int64_t t = c[s]; t < c[s + 1]; ++t) lo[b * p.Tq + t] = c[s], hi[b * p.Tq + t] = std::min(hi[b * p.Tq + t], c[s + 1]);
      }
      for (int64_t t = c[S]; t < p.Tq; ++t) lo[b * p.Tq + t] = hi[b * p.Tq + t] = 0;  // past the last document
    }
  }
  return p;
}

// (B, Tkp) additive bias, 0 on real keys and -inf on padding and on the keys past Tk, or undefined.
template <typename T>
at::Tensor padding_bias(const Problem& p, int64_t Tkp) {
  if (!p.mask.defined()) return at::Tensor();
  auto bias = at::full({p.B, Tkp}, -std::numeric_limits<T>::infinity(), p.q.options());
  T* out = bias.template data_ptr<T>();
  const bool* m = p.mask.data_ptr<bool>();
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t j = 0; j < p.Tk; ++j)
      out[b * Tkp + j] = m[b * p.mask.stride(0) + j] ? T(0) : -std::numeric_limits<T>::infinity();
  return bias;
}

// Pointer to row block (b, head) of a (B, heads, T, D) tensor with the last dimension contiguous.
template <typename T>
const T* head_of(const at::Tensor& x, int64_t b, int64_t h) {
  return x.template data_ptr<T>() + b * x.stride(0) + h * x.stride(1);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward(const Problem& p, double scale) {
  const Kernels<T> kn = pick<T>();
  const int64_t B = p.B, H = p.H, G = p.G, Tq = p.Tq, Tk = p.Tk, D = p.D;
  // (B, H, Tq, D) over (B, Tq, H, D) memory: the caller's transpose(1, 2) back to token-major is then free, and the
  // output projection's saved input shares this storage with what the backward keeps (one copy, not two).
  auto out = at::empty({B, Tq, H, D}, p.q.options()).transpose(1, 2);
  auto lse = at::empty({B, H, Tq}, p.q.options());
  if (B * H * Tq == 0) return {out, lse};
  const int64_t Dp = round_up(D, kn.w), Tkp = round_up(std::max<int64_t>(Tk, 1), kKeyBlockBwd);
  const T scale2 = static_cast<T>(scale * 1.4426950408889634);
  const auto bias = padding_bias<T>(p, Tkp);
  const T* pad = bias.defined() ? bias.template data_ptr<T>() : nullptr;
  const int64_t *lo = p.lo.data_ptr<int64_t>(), *hi = p.hi.data_ptr<int64_t>();
  const T *qp = p.q.template data_ptr<T>(), *kp = p.k.template data_ptr<T>(), *vp = p.v.template data_ptr<T>();
  T *op = out.template data_ptr<T>(), *lp = lse.template data_ptr<T>();
  if (G * Tq <= kDecodeRows && D <= kMaxDecodeD) {  // decoding: read the cache in place, one task per kv head
    dynamic_for<T>(B * p.Hkv, kKeyBlock + Dp + kn.w, 2 * B * H * Tq * Tk * D, [&](int64_t i, T* scratch) {
      const int64_t b = i / p.Hkv, kh = i % p.Hkv;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kh * G + g;
        DecodeRows<T> t{qp + b * p.q.stride(0) + h * p.q.stride(1), p.q.stride(2), Tq, lo + b * Tq, hi + b * Tq,
                        kp + b * p.k.stride(0) + kh * p.k.stride(1), vp + b * p.v.stride(0) + kh * p.v.stride(1),
                        p.k.stride(2), p.v.stride(2), D, pad != nullptr ? pad + b * Tkp : nullptr, scale2,
                        op + b * out.stride(0) + h * out.stride(1), out.stride(2), lp + (b * H + h) * Tq, 1};
        kn.decode_rows(t, scratch);
      }
    });
    return {out, lse};
  }
  // Packed keys (panels) and values (rows) of every (b, kv head), filled by the first B * Hkv jobs.
  auto kpan = at::empty({B * p.Hkv, Tkp * Dp}, p.q.options()), vrows = at::empty({B * p.Hkv, Tkp * Dp}, p.q.options());
  T *kpan_p = kpan.template data_ptr<T>(), *vrows_p = vrows.template data_ptr<T>();
  const int64_t n_tiles = (Tq + kQTile - 1) / kQTile, n_prep = B * p.Hkv;
  Ready ready(n_prep);
  dynamic_for<T>(n_prep + B * H * n_tiles, 2 * kQTile * Dp + kQTile * kKeyBlock + 2 * kQTile, 2 * B * H * Tq * Tk * D,
                 [&](int64_t i, T* scratch) {
    if (i < n_prep) {
      const int64_t b = i / p.Hkv, kh = i % p.Hkv;
      kn.pack_panels(head_of<T>(p.k, b, kh), p.k.stride(2), Tk, D, Dp, Tkp, kpan_p + i * Tkp * Dp);
      kn.pack_rows(head_of<T>(p.v, b, kh), p.v.stride(2), Tk, D, Tkp, Dp, T(1), vrows_p + i * Tkp * Dp);
      ready.done(i);
      return;
    }
    // Last tiles first: under a causal mask they see the most keys, and starting them early balances the end.
    const int64_t j = i - n_prep, tile = n_tiles - 1 - j / (B * H), bh = j % (B * H), b = bh / H, h = bh % H;
    const int64_t q0 = tile * kQTile, kv = b * p.Hkv + h / G;
    ready.wait(kv);
    FwdTile<T> t{qp + b * p.q.stride(0) + h * p.q.stride(1) + q0 * p.q.stride(2), p.q.stride(2),
                 std::min(kQTile, Tq - q0), lo + b * Tq + q0, hi + b * Tq + q0, kpan_p + kv * Tkp * Dp,
                 vrows_p + kv * Tkp * Dp, Dp, pad != nullptr ? pad + b * Tkp : nullptr, D, Dp, scale2,
                 op + b * out.stride(0) + h * out.stride(1) + q0 * out.stride(2), out.stride(2), lp + bh * Tq + q0};
    kn.forward_tile(t, scratch);
  });
  return {out, lse};
}

// Pack what the backward of one (b, kv head) reads, into `dst`: its G query heads' q and dO rows, lse in base 2
// and delta = rowsum(dO * O) (G, Tqp each), then its keys as panels and rows and its values as panels.
template <typename T>
void backward_pack(const Kernels<T>& kn, const Problem& p, const at::Tensor& grad, const at::Tensor& out,
                   const T* lse, int64_t bk, int64_t Tqp, int64_t Tkp, int64_t Dp, T* dst) {
  const int64_t b = bk / p.Hkv, kh = bk % p.Hkv, G = p.G, Tq = p.Tq, D = p.D;
  T *q = dst, *dout = q + G * Tqp * Dp, *lse2 = dout + G * Tqp * Dp, *delta = lse2 + G * Tqp;
  T* kpan = delta + G * Tqp;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = kh * G + g;
    kn.pack_rows(head_of<T>(p.q, b, h), p.q.stride(2), Tq, D, Tqp, Dp, T(1), q + g * Tqp * Dp);
    kn.pack_rows(head_of<T>(grad, b, h), grad.stride(2), Tq, D, Tqp, Dp, T(1), dout + g * Tqp * Dp);
    const T* o = head_of<T>(out, b, h);
    const T* l = lse + (b * p.H + h) * Tq;
    for (int64_t r = 0; r < Tqp; ++r) {
      const bool real = r < Tq && std::isfinite(l[r]);
      lse2[g * Tqp + r] = real ? l[r] * T(1.4426950408889634) : std::numeric_limits<T>::infinity();
      T acc = 0;
      if (r < Tq) {
        const T* dor = dout + (g * Tqp + r) * Dp;
        for (int64_t d = 0; d < D; ++d) acc += dor[d] * o[r * out.stride(2) + d];
      }
      delta[g * Tqp + r] = acc;
    }
  }
  kn.pack_panels(head_of<T>(p.k, b, kh), p.k.stride(2), p.Tk, D, Dp, Tkp, kpan);
  kn.pack_rows(head_of<T>(p.k, b, kh), p.k.stride(2), p.Tk, D, Tkp, Dp, T(1), kpan + Tkp * Dp);
  kn.pack_panels(head_of<T>(p.v, b, kh), p.v.stride(2), p.Tk, D, Dp, Tkp, kpan + 2 * Tkp * Dp);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const Problem& p, const at::Tensor& grad_in,
                                                        const at::Tensor& out_in, const at::Tensor& lse_in,
                                                        double scale) {
  const Kernels<T> kn = pick<T>();
  const int64_t B = p.B, H = p.H, Hkv = p.Hkv, G = p.G, Tq = p.Tq, Tk = p.Tk, D = p.D;
  auto dq = at::empty({B, H, Tq, D}, p.q.options());
  auto dk = at::empty({B, Hkv, Tk, D}, p.q.options()), dv = at::empty({B, Hkv, Tk, D}, p.q.options());
  if (B * H * Tq == 0 || Tk == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  const int64_t Dp = round_up(D, kn.w), Tkp = round_up(Tk, kKeyBlockBwd), Tqp = round_up(Tq, kQTile);
  const auto grad = last_dim_contiguous(grad_in), out = last_dim_contiguous(out_in), lse = lse_in.contiguous();
  // the union interval of each query tile, per batch row: which tiles a key block must visit
  const int64_t n_tiles = Tqp / kQTile;
  std::vector<int64_t> qlo(B * n_tiles, std::numeric_limits<int64_t>::max()), qhi(B * n_tiles, 0);
  const int64_t *lo = p.lo.template data_ptr<int64_t>(), *hi = p.hi.template data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < Tq; ++t) {
      if (lo[b * Tq + t] >= hi[b * Tq + t]) continue;
      const int64_t at = b * n_tiles + t / kQTile;
      qlo[at] = std::min(qlo[at], lo[b * Tq + t]), qhi[at] = std::max(qhi[at], hi[b * Tq + t]);
    }
  }
  const auto bias = padding_bias<T>(p, Tkp);
  const T* pad = bias.defined() ? bias.template data_ptr<T>() : nullptr;
  // Enough jobs for every thread: the key blocks of one (b, kv head) are dealt round-robin to `splits` jobs, each
  // with its own dQ accumulator, so nothing is written by two threads; with one split a job writes dQ itself.
  const int64_t n_blocks = Tkp / kKeyBlockBwd, n_kv = B * Hkv;
  const int64_t splits = std::min(n_blocks, std::max<int64_t>(1, (4 * at::get_num_threads() + n_kv - 1) / n_kv));
  // Packed per (b, kv head) by the first n_kv jobs: the group's q and dO rows (Tqp, Dp), lse in base 2 (+inf where a
  // row saw nothing, so its P is 0) and delta = rowsum(dO * O); keys as panels and rows, values as panels.
  const int64_t qsize = G * Tqp * Dp, ksize = Tkp * Dp;
  auto packed = at::empty({n_kv, 2 * qsize + 2 * G * Tqp + 3 * ksize}, p.q.options());
  auto dq_acc = at::empty({splits, B * H, Tqp * Dp}, p.q.options());
  T *pk = packed.template data_ptr<T>(), *dqa = dq_acc.template data_ptr<T>();
  T *dqp = dq.template data_ptr<T>(), *dkp = dk.template data_ptr<T>(), *dvp = dv.template data_ptr<T>();
  const T* lsep = lse.template data_ptr<T>();
  const int64_t stride = packed.size(1);
  Ready ready(n_kv);
  dynamic_for<T>(n_kv + n_kv * splits, 2 * kQTile * kKeyBlockBwd + 2 * kKeyBlockBwd * Dp, 5 * B * H * Tq * Tk * D,
                 [&](int64_t i, T* scratch) {
    if (i < n_kv) {
      backward_pack<T>(kn, p, grad, out, lsep, i, Tqp, Tkp, Dp, pk + i * stride);
      ready.done(i);
      return;
    }
    const int64_t j = i - n_kv, split = j % splits, bk = j / splits, b = bk / Hkv, h0 = (bk % Hkv) * G;
    ready.wait(bk);
    const T* base = pk + bk * stride;
    T* dq_own = dqa + (split * B * H + b * H + h0) * Tqp * Dp;  // (G, Tqp, Dp)
    std::fill(dq_own, dq_own + qsize, T(0));
    T* dk_blk = scratch + 2 * kQTile * kKeyBlockBwd;
    T* dv_blk = dk_blk + kKeyBlockBwd * Dp;
    for (int64_t blk = split; blk < n_blocks; blk += splits) {
      const int64_t k0 = blk * kKeyBlockBwd;
      BwdBlock<T> t{base, base + qsize, base + 2 * qsize, base + 2 * qsize + G * Tqp, lo + b * Tq, hi + b * Tq,
                    qlo.data() + b * n_tiles, qhi.data() + b * n_tiles, G, Tq, Tqp, Dp,
                    base + 2 * qsize + 2 * G * Tqp, base + 2 * qsize + 2 * G * Tqp + 2 * ksize,
                    base + 2 * qsize + 2 * G * Tqp + ksize, pad != nullptr ? pad + b * Tkp : nullptr, k0,
                    kKeyBlockBwd, static_cast<T>(scale), static_cast<T>(scale * 1.4426950408889634), dq_own, dk_blk,
                    dv_blk};
      kn.backward_block(t, scratch);
      for (int64_t r = 0; r < kKeyBlockBwd && k0 + r < Tk; ++r) {
        std::memcpy(dkp + (bk * Tk + k0 + r) * D, dk_blk + r * Dp, D * sizeof(T));
        std::memcpy(dvp + (bk * Tk + k0 + r) * D, dv_blk + r * Dp, D * sizeof(T));
      }
    }
    if (splits == 1) {  // this job holds the whole dQ of its heads: scale and write it out
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = 0; r < Tq; ++r)
          for (int64_t d = 0; d < D; ++d)
            dqp[((b * H + h0 + g) * Tq + r) * D + d] = dq_own[(g * Tqp + r) * Dp + d] * static_cast<T>(scale);
    }
  });
  if (splits > 1) dq.copy_(dq_acc.sum(0).view({B, H, Tqp, Dp}).narrow(2, 0, Tq).narrow(3, 0, D).mul_(scale));
  return {dq, dk, dv};
}

}  // namespace attn

std::tuple<at::Tensor, at::Tensor> flash_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, bool causal,
                                                               const c10::optional<at::Tensor>& key_padding_mask,
                                                               const c10::optional<at::Tensor>& cu_seqlens,
                                                               double scale) {
  const auto p = attn::problem(q.detach(), k.detach(), v.detach(), causal, key_padding_mask, cu_seqlens);
  if (q.scalar_type() == at::kDouble) return attn::forward<double>(p, scale);
  TORCH_CHECK(q.scalar_type() == at::kFloat, "tuneforge::flash_attention (CPU): float32 or float64, got ",
              q.scalar_type(), " (the Python face converts other dtypes)");
  return attn::forward<float>(p, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, bool causal, const c10::optional<at::Tensor>& key_padding_mask,
    const c10::optional<at::Tensor>& cu_seqlens, double scale) {
  const auto p = attn::problem(q.detach(), k.detach(), v.detach(), causal, key_padding_mask, cu_seqlens);
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes() && grad.scalar_type() == q.scalar_type(),
              "tuneforge::flash_attention_backward: grad and out must be like q");
  if (q.scalar_type() == at::kDouble) return attn::backward<double>(p, grad.detach(), out.detach(), lse.detach(), scale);
  return attn::backward<float>(p, grad.detach(), out.detach(), lse.detach(), scale);
}

std::string cpu_isa() { return attn::chosen_isa(); }

TORCH_LIBRARY_FRAGMENT(tuneforge, m) {
  m.def("flash_attention_forward(Tensor q, Tensor k, Tensor v, bool causal, Tensor? key_padding_mask, "
        "Tensor? cu_seqlens, float scale) -> (Tensor, Tensor)");
  m.def("flash_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
        "Tensor? key_padding_mask, Tensor? cu_seqlens, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("cpu_isa() -> str", &cpu_isa);
}

TORCH_LIBRARY_IMPL(tuneforge, CPU, m) {
  m.impl("flash_attention_forward", &flash_attention_forward_cpu);
  m.impl("flash_attention_backward", &flash_attention_backward_cpu);
}

}  // namespace tuneforge
