// The CPU attention kernels, written once against a small vector type `V` and compiled once per instruction set.
//
// attention.cpp includes this file several times, each time inside a `#pragma GCC target(...)` region and a
// namespace that defines `V` (AVX-512, AVX2, portable scalar) and the element type `T`. So one source gives every
// instruction set and the choice is made at run time (cpuid): no -march=native, a built wheel runs on another CPU.
// No include guard on purpose. Nothing here includes a header: everything it uses is included before the regions.
//
// `V` provides: W (lanes), reg, zero(), load(p), store(p, x), set1(s), fma(a, b, c) = a * b + c, add, mul, sub,
// max, hmax, hsum, load_part(p, n) (the first n lanes, the rest 0), and either exp2(x) (W = 1) or round(x) and
// pow2(n) (2^n for integral n, exactly 0 at -127) from which vexp2 below builds a vector exp2,
// MR (rows of the score micro-kernel), NRV (its width in vectors), CV (the most vectors one accumulate pass holds
// in registers) and rows_for(nv) (rows of the accumulate
// micro-kernel that keep rows_for(nv) * nv accumulators plus nv loads and a broadcast in registers).
//
// Shapes: Dp = D rounded up to a multiple of W; keys padded to Tkp (a multiple of kKeyBlockBwd, zero rows); queries
// in tiles of kQTile rows. Scores are in base 2: s2 = (q . k) * scale * log2(e), so softmax uses exp2.

constexpr int64_t NR = V::NRV * V::W;  // keys per packed panel

// 2^x for x <= ~0, exactly 0 below -127 (a masked score, -inf, gives 0, never NaN). Vectors: 2^x = 2^n e^(f ln2)
// with n = round(x), |f| <= 1/2, e^y by its degree-7 Taylor polynomial (relative error ~5e-9, below float32's).
// The one-lane path is float64's (gradcheck) and the portable one's: the library's exact exp2.
template <typename U = V>  // a template, so the branch this vector type lacks is never compiled
inline typename U::reg vexp2(typename U::reg x) {
  if constexpr (U::W == 1) {
    return U::exp2(x);
  } else {
    x = U::max(x, U::set1(-127.f));
    const auto n = U::round(x);
    const auto f = U::mul(U::sub(x, n), U::set1(0.6931471805599453f));
    auto p = U::set1(1.f / 5040);
    p = U::fma(p, f, U::set1(1.f / 720));
    p = U::fma(p, f, U::set1(1.f / 120));
    p = U::fma(p, f, U::set1(1.f / 24));
    p = U::fma(p, f, U::set1(1.f / 6));
    p = U::fma(p, f, U::set1(0.5f));
    p = U::fma(p, f, U::set1(1.f));
    p = U::fma(p, f, U::set1(1.f));
    return U::mul(p, U::pow2(n));
  }
}

// C (rows x NV*W) (+)= sum_i A(r, i) B(i, :), A read through strides (a_rs, a_cs) so one kernel serves A and A^T,
// B rows contiguous with stride ldb. Accumulators stay in registers for the whole reduction over `kdim`.
template <int ROWS, int NV, bool ACCUMULATE>
inline void tile(int64_t kdim, const T* a, int64_t a_rs, int64_t a_cs, const T* b, int64_t ldb, T* c, int64_t ldc) {
  typename V::reg acc[ROWS][NV];
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int x = 0; x < NV; ++x) acc[r][x] = ACCUMULATE ? V::load(c + r * ldc + x * V::W) : V::zero();
  for (int64_t i = 0; i < kdim; ++i) {
    typename V::reg bv[NV];
    const T* brow = b + i * ldb;
#pragma GCC unroll 8
    for (int x = 0; x < NV; ++x) bv[x] = V::load(brow + x * V::W);
    const T* acol = a + i * a_cs;
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
      const typename V::reg ar = V::set1(acol[r * a_rs]);
#pragma GCC unroll 8
      for (int x = 0; x < NV; ++x) acc[r][x] = V::fma(ar, bv[x], acc[r][x]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int x = 0; x < NV; ++x) V::store(c + r * ldc + x * V::W, acc[r][x]);
}

// C (m x n) (+)= A(m x k) B(k x n) with m a multiple of rows_for(nv) (callers pad), n = Dp columns in chunks of up
// to V::CV vectors. A through strides (row-major P or dS: a_rs = ld, a_cs = 1; transposed: a_rs = 1, a_cs = ld).
template <int NV>
inline void accumulate_chunk(int64_t m, int64_t k, const T* a, int64_t a_rs, int64_t a_cs, const T* b, int64_t ldb,
                             T* c, int64_t ldc) {
  constexpr int R = V::rows_for(NV);
  for (int64_t r = 0; r < m; r += R) tile<R, NV, true>(k, a + r * a_rs, a_rs, a_cs, b, ldb, c + r * ldc, ldc);
}

inline void accumulate(int64_t m, int64_t n_vec, int64_t k, const T* a, int64_t a_rs, int64_t a_cs, const T* b,
                       int64_t ldb, T* c, int64_t ldc) {
  for (int64_t x0 = 0; x0 < n_vec; x0 += V::CV) {
    const int64_t nv = std::min<int64_t>(V::CV, n_vec - x0);
    const T* bx = b + x0 * V::W;
    T* cx = c + x0 * V::W;
    switch (nv) {  // nv <= V::CV; the `? : 1` only keeps cases this width never reaches compiling
      case 1: accumulate_chunk<1>(m, k, a, a_rs, a_cs, bx, ldb, cx, ldc); break;
      case 2: accumulate_chunk<2>(m, k, a, a_rs, a_cs, bx, ldb, cx, ldc); break;
      case 3: accumulate_chunk<3 <= V::CV ? 3 : 1>(m, k, a, a_rs, a_cs, bx, ldb, cx, ldc); break;
      case 4: accumulate_chunk<4 <= V::CV ? 4 : 1>(m, k, a, a_rs, a_cs, bx, ldb, cx, ldc); break;
      case 5: accumulate_chunk<5 <= V::CV ? 5 : 1>(m, k, a, a_rs, a_cs, bx, ldb, cx, ldc); break;
      case 6: accumulate_chunk<6 <= V::CV ? 6 : 1>(m, k, a, a_rs, a_cs, bx, ldb, cx, ldc); break;
      case 7: accumulate_chunk<7 <= V::CV ? 7 : 1>(m, k, a, a_rs, a_cs, bx, ldb, cx, ldc); break;
      default: accumulate_chunk<8 <= V::CV ? 8 : 1>(m, k, a, a_rs, a_cs, bx, ldb, cx, ldc); break;
    }
  }
}

// S (m x ncols) = A (m x Dp, row-major, lda) times a run of packed key panels (each Dp x NR, contiguous).
inline void scores(int64_t m, int64_t ncols, int64_t Dp, const T* a, int64_t lda, const T* panels, T* s, int64_t lds) {
  for (int64_t c0 = 0; c0 < ncols; c0 += NR) {
    const T* panel = panels + (c0 / NR) * Dp * NR;
    for (int64_t r = 0; r < m; r += V::MR) tile<V::MR, V::NRV, false>(Dp, a + r * lda, lda, 1, panel, NR, s + r * lds + c0, lds);
  }
}

// Pack keys [0, Tk) of one (b, kv head), strided rows `src` (row stride ld), into panels (Tkp / NR, Dp, NR):
// panel p holds keys p*NR .. p*NR + NR - 1 with the NR values of one feature contiguous. Padding is zero.
inline void pack_panels(const T* src, int64_t ld, int64_t Tk, int64_t D, int64_t Dp, int64_t Tkp, T* dst) {
  for (int64_t p = 0; p < Tkp / NR; ++p) {
    T* panel = dst + p * Dp * NR;
    for (int64_t j = 0; j < NR; ++j) {
      const int64_t key = p * NR + j;
      const T* row = key < Tk ? src + key * ld : nullptr;
      for (int64_t d = 0; d < Dp; ++d) panel[d * NR + j] = (row != nullptr && d < D) ? row[d] : T(0);
    }
  }
}

// Copy rows (strided) into a (rows_p, Dp) row-major block times `mul`, zero padded.
inline void pack_rows(const T* src, int64_t ld, int64_t rows, int64_t D, int64_t rows_p, int64_t Dp, T mul, T* dst) {
  for (int64_t r = 0; r < rows_p; ++r) {
    T* out = dst + r * Dp;
    if (r >= rows) {
      std::fill(out, out + Dp, T(0));
      continue;
    }
    const T* in = src + r * ld;
    for (int64_t d = 0; d < D; ++d) out[d] = in[d] * mul;
    std::fill(out + D, out + Dp, T(0));
  }
}

// Keys outside [lo, hi) of a row of scores (columns are keys k0 .. k0 + ncols - 1) become -inf; padding keys add
// their bias (0 or -inf). Returns the row's maximum (-inf when it sees nothing here).
inline T mask_row(T* row, int64_t ncols, int64_t k0, int64_t lo, int64_t hi, const T* pad) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t a = std::max<int64_t>(lo - k0, 0), b = std::min<int64_t>(hi - k0, ncols);
  if (a >= b) {
    std::fill(row, row + ncols, ninf);
    return ninf;
  }
  std::fill(row, row + a, ninf);  // only on blocks that cross a row's interval: the causal diagonal, documents
  std::fill(row + b, row + ncols, ninf);
  typename V::reg mx = V::set1(ninf);
  if (pad != nullptr) {
    for (int64_t j = 0; j < ncols; j += V::W) {
      const auto x = V::add(V::load(row + j), V::load(pad + k0 + j));
      V::store(row + j, x);
      mx = V::max(mx, x);
    }
  } else {
    for (int64_t j = 0; j < ncols; j += V::W) mx = V::max(mx, V::load(row + j));
  }
  return V::hmax(mx);
}

// row[j] = exp2(row[j] * mul - shift); returns the sum. Masked entries (-inf) give exactly 0.
inline T exp2_scalar(T x) { return std::exp2(x); }

inline T exp2_row(T* row, int64_t ncols, T mul, T shift) {
  const auto vm = V::set1(mul), vs = V::set1(-shift);
  auto sum = V::zero();
  for (int64_t j = 0; j < ncols; j += V::W) {
    const auto p = vexp2(V::fma(V::load(row + j), vm, vs));
    V::store(row + j, p);
    sum = V::add(sum, p);
  }
  return V::hsum(sum);
}


// One query tile against every key block it sees: scores, mask on the blocks that need it, online softmax, P V.
inline void forward_tile(const FwdTile<T>& t, T* scratch) {
  const int64_t Dp = t.Dp, rows_p = (t.rows + kQTile - 1) / kQTile * kQTile;
  T* qs = scratch;                      // (kQTile, Dp) scaled queries
  T* acc = qs + kQTile * Dp;            // (kQTile, Dp) unnormalised output
  T* s = acc + kQTile * Dp;             // (kQTile, kKeyBlock) scores, then probabilities
  T* m = s + kQTile * kKeyBlock;        // (kQTile,) running max (base 2)
  T* l = m + kQTile;                    // (kQTile,) running sum
  const T ninf = -std::numeric_limits<T>::infinity();
  pack_rows(t.q, t.q_ld, t.rows, t.D, rows_p, Dp, t.scale2, qs);
  std::fill(acc, acc + rows_p * Dp, T(0));
  std::fill(m, m + kQTile, ninf);
  std::fill(l, l + kQTile, T(0));
  int64_t klo = std::numeric_limits<int64_t>::max(), khi = 0;
  for (int64_t r = 0; r < t.rows; ++r) {
    if (t.lo[r] < t.hi[r]) klo = std::min(klo, t.lo[r]), khi = std::max(khi, t.hi[r]);
  }
  for (int64_t k0 = khi > 0 ? klo / NR * NR : 0; k0 < khi; k0 += kKeyBlock) {
    const int64_t ncols = (std::min(k0 + kKeyBlock, khi) - k0 + NR - 1) / NR * NR;
    scores(rows_p, ncols, Dp, qs, Dp, t.panels + (k0 / NR) * Dp * NR, s, kKeyBlock);
    for (int64_t r = 0; r < t.rows; ++r) {
      T* row = s + r * kKeyBlock;
      const T mx = mask_row(row, ncols, k0, t.lo[r], t.hi[r], t.pad);
      if (mx == ninf) {  // sees nothing in this block: contributes nothing
        std::fill(row, row + ncols, T(0));
        continue;
      }
      const T m_new = std::max(m[r], mx);
      const T corr = m[r] == ninf ? T(0) : exp2_scalar(m[r] - m_new);
      l[r] = l[r] * corr + exp2_row(row, ncols, T(1), m_new);
      m[r] = m_new;
      if (corr != T(1)) {
        const auto vc = V::set1(corr);
        for (int64_t d = 0; d < Dp; d += V::W) V::store(acc + r * Dp + d, V::mul(V::load(acc + r * Dp + d), vc));
      }
    }
    accumulate(rows_p, Dp / V::W, ncols, s, kKeyBlock, 1, t.v + k0 * t.v_ld, t.v_ld, acc, Dp);
  }
  for (int64_t r = 0; r < t.rows; ++r) {
    T* o = t.out + r * t.out_ld;
    if (l[r] == T(0)) {  // saw no key: zeros, lse = -inf
      std::fill(o, o + t.D, T(0));
      t.lse[r] = ninf;
      continue;
    }
    const T inv = T(1) / l[r];
    for (int64_t d = 0; d < t.D; ++d) o[d] = acc[r * Dp + d] * inv;
    t.lse[r] = (m[r] + std::log2(l[r])) * T(0.69314718055994530942);
  }
}

// Decoding: a few query rows (one kv head's group) read keys and values in place, strided, with no packing: the
// work is O(Tk D) per row, the same as a pack would cost. Scores one key at a time (dot, horizontal sum) into a
// block, then the same online softmax.
constexpr int64_t kMaxDecodeVec = kMaxDecodeD / V::W + 1;

inline void decode_rows(const DecodeRows<T>& t, T* scratch) {
  const int64_t D = t.D, nfull = D / V::W, tail = D - nfull * V::W;
  const T ninf = -std::numeric_limits<T>::infinity();
  T* s = scratch;                      // (kKeyBlock,) scores of one block
  T* acc = s + kKeyBlock;              // (Dp,)
  for (int64_t r = 0; r < t.rows; ++r) {
    const T* qr = t.q + r * t.q_ld;
    typename V::reg qv[kMaxDecodeVec];
    for (int64_t x = 0; x < nfull; ++x) qv[x] = V::mul(V::load(qr + x * V::W), V::set1(t.scale2));
    if (tail) qv[nfull] = V::mul(V::load_part(qr + nfull * V::W, tail), V::set1(t.scale2));
    const int64_t nv = nfull + (tail ? 1 : 0);
    T m = ninf, l = 0;
    std::fill(acc, acc + nv * V::W, T(0));
    for (int64_t k0 = t.lo[r]; k0 < t.hi[r]; k0 += kKeyBlock) {
      const int64_t n = std::min(kKeyBlock, t.hi[r] - k0);
      T mx = ninf;
      for (int64_t j = 0; j < n; ++j) {
        const T* kr = t.k + (k0 + j) * t.k_ld;
        auto d0 = V::zero();
        for (int64_t x = 0; x < nfull; ++x) d0 = V::fma(qv[x], V::load(kr + x * V::W), d0);
        if (tail) d0 = V::fma(qv[nfull], V::load_part(kr + nfull * V::W, tail), d0);
        T sc = V::hsum(d0);
        if (t.pad != nullptr) sc += t.pad[k0 + j];
        s[j] = sc;
        mx = std::max(mx, sc);
      }
      if (mx == ninf) continue;
      const T m_new = std::max(m, mx);
      const T corr = m == ninf ? T(0) : exp2_scalar(m - m_new);
      const int64_t n_up = (n + V::W - 1) / V::W * V::W;
      std::fill(s + n, s + n_up, ninf);
      l = l * corr + exp2_row(s, n_up, T(1), m_new);
      if (corr != T(1)) {
        for (int64_t x = 0; x < nv; ++x) V::store(acc + x * V::W, V::mul(V::load(acc + x * V::W), V::set1(corr)));
      }
      for (int64_t j = 0; j < n; ++j) {
        if (s[j] == T(0)) continue;
        const T* vr = t.v + (k0 + j) * t.v_ld;
        const auto vp = V::set1(s[j]);
        for (int64_t x = 0; x < nfull; ++x)
          V::store(acc + x * V::W, V::fma(vp, V::load(vr + x * V::W), V::load(acc + x * V::W)));
        if (tail) V::store(acc + nfull * V::W, V::fma(vp, V::load_part(vr + nfull * V::W, tail), V::load(acc + nfull * V::W)));
      }
      m = m_new;
    }
    T* o = t.out + r * t.out_ld;
    if (l == T(0)) {
      std::fill(o, o + D, T(0));
      t.lse[r * t.lse_ld] = ninf;
      continue;
    }
    const T inv = T(1) / l;
    for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
    t.lse[r * t.lse_ld] = (m + std::log2(l)) * T(0.69314718055994530942);
  }
}

// Backward, FlashAttention-2 order: one key block of one (b, kv head) at a time, its dK and dV accumulated here
// across every query head of the group and every query tile that sees the block; dQ accumulated into this task's
// own buffer (no atomics). Inputs packed by the caller: q, dO row-major (Tqp, Dp) per head, lse2 (base 2, +inf
// for rows that saw nothing) and delta = rowsum(dO * O) per row, keys as panels and row-major, values as panels.

inline void backward_block(const BwdBlock<T>& t, T* scratch) {
  const int64_t Dp = t.Dp, nvec = Dp / V::W, nc = t.ncols;
  T* p = scratch;                          // (kQTile, kKeyBlockBwd)
  T* dp = p + kQTile * kKeyBlockBwd;       // (kQTile, kKeyBlockBwd)
  std::fill(t.dk, t.dk + nc * Dp, T(0));
  std::fill(t.dv, t.dv + nc * Dp, T(0));
  const T* kp = t.k_panels + (t.k0 / NR) * Dp * NR;
  const T* vp = t.v_panels + (t.k0 / NR) * Dp * NR;
  const T* kr = t.k_rows + t.k0 * Dp;
  for (int64_t qt = 0; qt * kQTile < t.Tq; ++qt) {
    if (t.qlo[qt] >= t.k0 + nc || t.qhi[qt] <= t.k0) continue;  // this tile sees no key of the block
    const int64_t q0 = qt * kQTile, rows = std::min(kQTile, t.Tq - q0);
    for (int64_t g = 0; g < t.G; ++g) {
      const T* qg = t.q + (g * t.Tqp + q0) * Dp;
      const T* dog = t.dout + (g * t.Tqp + q0) * Dp;
      const T* lse2 = t.lse2 + g * t.Tqp + q0;
      const T* delta = t.delta + g * t.Tqp + q0;
      scores(kQTile, nc, Dp, qg, Dp, kp, p, kKeyBlockBwd);     // S = Q K^T (unscaled)
      scores(kQTile, nc, Dp, dog, Dp, vp, dp, kKeyBlockBwd);   // dP = dO V^T
      for (int64_t r = 0; r < kQTile; ++r) {
        T* prow = p + r * kKeyBlockBwd;
        T* drow = dp + r * kKeyBlockBwd;
        if (r >= rows) {  // padding rows of the tile: no gradient
          std::fill(prow, prow + nc, T(0));
          std::fill(drow, drow + nc, T(0));
          continue;
        }
        const T mx = mask_row(prow, nc, t.k0, t.lo[q0 + r], t.hi[q0 + r], t.pad);
        if (mx == -std::numeric_limits<T>::infinity()) {
          std::fill(prow, prow + nc, T(0));
          std::fill(drow, drow + nc, T(0));
          continue;
        }
        exp2_row(prow, nc, t.scale2, lse2[r]);               // P = exp2(S scale2 - lse2)
        const auto dl = V::set1(delta[r]);
        for (int64_t j = 0; j < nc; j += V::W) {             // dS = P (dP - delta), in dp
          V::store(drow + j, V::mul(V::load(prow + j), V::sub(V::load(drow + j), dl)));
        }
      }
      accumulate(nc, nvec, kQTile, p, 1, kKeyBlockBwd, dog, Dp, t.dv, Dp);   // dV += P^T dO
      accumulate(nc, nvec, kQTile, dp, 1, kKeyBlockBwd, qg, Dp, t.dk, Dp);   // dK += dS^T Q
      accumulate(kQTile, nvec, nc, dp, kKeyBlockBwd, 1, kr, Dp, t.dq + (g * t.Tqp + q0) * Dp, Dp);  // dQ += dS K
    }
  }
  const auto vs = V::set1(t.scale);
  for (int64_t i = 0; i < nc * Dp; i += V::W) V::store(t.dk + i, V::mul(V::load(t.dk + i), vs));
}
