// The CPU attention kernels' instruction sets: the vector types (AVX-512, AVX2, portable), the per-call argument
// structs, and the run-time choice among them. Each `namespace <isa>` below compiles attention_isa.h inside its own
// `#pragma GCC target` region, so one translation unit holds every instruction set and cpuid picks at run time:
// no -march=native, and a wheel built on one CPU runs on another. Included by attention.cpp only.
#pragma once

#include <c10/util/Exception.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

namespace tuneforge {
namespace attn {

constexpr int64_t kQTile = 48;         // query rows per tile: a multiple of every micro-kernel's row count
constexpr int64_t kKeyBlock = 256;     // forward keys per block: (48 x 256) scores + K and V blocks stay in L2
constexpr int64_t kKeyBlockBwd = 96;   // backward keys per block: its dK, dV (96 x Dp) stay in cache
constexpr int64_t kMaxDecodeD = 512;   // head sizes the decode path keeps in registers
constexpr int64_t kDecodeRows = 8;     // at most this many query rows per kv head take the decode path

template <typename T>
struct FwdTile {
  const T* q;                // this tile's first query row, rows strided by q_ld
  int64_t q_ld, rows;        // rows: real rows (<= kQTile)
  const int64_t *lo, *hi;    // (rows,) the key interval each row sees
  const T* panels;           // the (b, kv head)'s packed key panels
  const T* v;                // its values, packed row-major (Tkp, Dp)
  int64_t v_ld;
  const T* pad;              // (Tkp,) padding bias of this batch row (0 or -inf), or nullptr
  int64_t D, Dp;
  T scale2;                  // scale * log2(e)
  T* out;                    // rows strided by out_ld
  int64_t out_ld;
  T* lse;                    // (rows,) natural log-sum-exp
};

template <typename T>
struct DecodeRows {
  const T* q;                // rows strided by q_ld
  int64_t q_ld, rows;
  const int64_t *lo, *hi;    // (rows,)
  const T *k, *v;            // rows strided by k_ld, v_ld: read in place
  int64_t k_ld, v_ld, D;
  const T* pad;              // (Tkp,) or nullptr
  T scale2;
  T* out;                    // rows strided by out_ld
  int64_t out_ld;
  T* lse;                    // strided by lse_ld
  int64_t lse_ld;
};

template <typename T>
struct BwdBlock {
  const T *q, *dout;         // (G, Tqp, Dp): the group's query heads, packed
  const T *lse2, *delta;     // (G, Tqp): lse in base 2 (+inf where a row saw nothing), rowsum(dO * O)
  const int64_t *lo, *hi;    // (Tq,) per query row of this batch row
  const int64_t *qlo, *qhi;  // (query tiles,) the union interval of each tile
  int64_t G, Tq, Tqp, Dp;
  const T *k_panels, *v_panels;  // (Tkp / NR, Dp, NR)
  const T* k_rows;           // (Tkp, Dp)
  const T* pad;              // (Tkp,) or nullptr
  int64_t k0, ncols;         // this key block
  T scale, scale2;
  T* dq;                     // (G, Tqp, Dp) this task's dQ accumulator (unscaled)
  T* dk;                     // (ncols, Dp) out, scaled
  T* dv;                     // (ncols, Dp) out
};

// The entry points one instruction set provides.
template <typename T>
struct Kernels {
  const char* name;
  int64_t w, nr;
  void (*pack_panels)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*);
  void (*pack_rows)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T, T*);
  void (*forward_tile)(const FwdTile<T>&, T*);
  void (*decode_rows)(const DecodeRows<T>&, T*);
  void (*backward_block)(const BwdBlock<T>&, T*);
};

template <typename T>
struct Scalar {  // portable: any CPU, and float64 (exact exp2) for gradcheck
  static constexpr int W = 1, MR = 4, NRV = 4, CV = 8;
  using reg = T;
  static constexpr int rows_for(int) { return 4; }
  static inline reg zero() { return T(0); }
  static inline reg load(const T* p) { return *p; }
  static inline void store(T* p, reg x) { *p = x; }
  static inline reg set1(T s) { return s; }
  static inline reg fma(reg a, reg b, reg c) { return a * b + c; }
  static inline reg add(reg a, reg b) { return a + b; }
  static inline reg sub(reg a, reg b) { return a - b; }
  static inline reg mul(reg a, reg b) { return a * b; }
  static inline reg max(reg a, reg b) { return a > b ? a : b; }
  static inline T hmax(reg x) { return x; }
  static inline T hsum(reg x) { return x; }
  static inline reg load_part(const T* p, int64_t n) { return n > 0 ? *p : T(0); }
  static inline reg exp2(reg x) { return std::exp2(x); }  // exact: the scalar path is float64's (gradcheck)
};

#define TF_KERNELS_OF(ns, label)                                                                             \
  Kernels<T> kernels() {                                                                                     \
    return {label, V::W, NR, &pack_panels, &pack_rows, &forward_tile, &decode_rows, &backward_block};         \
  }

namespace scalar64 {
using T = double;
using V = Scalar<double>;
#include "attention_isa.h"
TF_KERNELS_OF(scalar64, "scalar")
}  // namespace scalar64

namespace scalar32 {
using T = float;
using V = Scalar<float>;
#include "attention_isa.h"
TF_KERNELS_OF(scalar32, "scalar")
}  // namespace scalar32

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
using T = float;
struct V {
  static constexpr int W = 8, MR = 6, NRV = 2, CV = 4;
  using reg = __m256;
  // rows x nv accumulators + nv loads + a broadcast within 16 registers; each count divides 48 and 96
  static constexpr int rows_for(int nv) { return nv == 1 ? 12 : nv == 2 ? 6 : nv == 3 ? 4 : 2; }
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static inline reg set1(float s) { return _mm256_set1_ps(s); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static inline float hsum(reg x) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  static inline float hmax(reg x) {
    const __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
  }
  static inline reg load_part(const float* p, int64_t n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes));
  }
  static inline reg round(reg x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^n for integral n in [-127, 127] through the exponent bits (n = -127 gives exactly 0)
  static inline reg pow2(reg n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
};
#include "attention_isa.h"
TF_KERNELS_OF(avx2, "avx2")
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
namespace avx512 {
using T = float;
struct V {
  static constexpr int W = 16, MR = 12, NRV = 2, CV = 8;
  using reg = __m512;
  // rows x nv accumulators + nv loads + a broadcast within 32 registers; each count divides 48 and 96
  static constexpr int rows_for(int nv) {
    return nv <= 2 ? 12 : nv == 3 ? 8 : nv == 4 ? 6 : nv <= 6 ? 4 : nv == 7 ? 3 : 2;
  }
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static inline reg set1(float s) { return _mm512_set1_ps(s); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static inline float hsum(reg x) { return _mm512_reduce_add_ps(x); }
  static inline float hmax(reg x) { return _mm512_reduce_max_ps(x); }
  static inline reg load_part(const float* p, int64_t n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
  }
  static inline reg round(reg x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline reg pow2(reg n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
};
#include "attention_isa.h"
TF_KERNELS_OF(avx512, "avx512")
}  // namespace avx512
#pragma GCC pop_options

#undef TF_KERNELS_OF

// The instruction set to run: the best this CPU has, or TUNEFORGE_CPU_ISA=avx512|avx2|scalar (read per call, so
// tests can compare every path on one machine). Asking for one the CPU lacks is an error, not a crash.
std::string chosen_isa() {
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* env = std::getenv("TUNEFORGE_CPU_ISA");
  const std::string want = env != nullptr ? env : "";
  if (want.empty() || want == "auto") return has512 ? "avx512" : has2 ? "avx2" : "scalar";
  TORCH_CHECK(want == "avx512" || want == "avx2" || want == "scalar",
              "TUNEFORGE_CPU_ISA=", want, ": use auto, avx512, avx2 or scalar");
  TORCH_CHECK(want != "avx512" || has512, "TUNEFORGE_CPU_ISA=avx512, but this CPU has no AVX-512 (F/DQ/VL/BW)");
  TORCH_CHECK(want != "avx2" || has2, "TUNEFORGE_CPU_ISA=avx2, but this CPU has no AVX2 with FMA");
  return want;
}

template <typename T>
Kernels<T> pick();

template <>
Kernels<double> pick<double>() {
  return scalar64::kernels();
}

template <>
Kernels<float> pick<float>() {
  const std::string isa = chosen_isa();
  return isa == "avx512" ? avx512::kernels() : isa == "avx2" ? avx2::kernels() : scalar32::kernels();
}

}  // namespace attn
}  // namespace tuneforge

