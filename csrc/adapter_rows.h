// Row chunks, tasks and adapter groups for the LoRA and adapter ops of ops.cpp (included there only).
//
// The ops are GEMM-bound, with skinny GEMMs (rank 16, bottleneck 64) and passes over (M, C) activations. On the
// CPU their rows are cut into chunks (tasks) that threads take one at a time; each task runs its chain of products
// on its own thread (BLAS inside a parallel region is sequential) while its rows are still in cache, and weight
// gradients are summed from per-chunk partials (deterministic, whichever thread ran a chunk). Measured on 2 cores
// against whole-matrix BLAS calls that BLAS splits across threads: as fast or faster when the machine is quiet,
// and 1.3-2x faster when another process shares the cores (a whole-matrix call waits for its slowest thread at
// every step; a delayed task here delays one chunk). Where tasks cannot run side by side (a build without OpenMP,
// one thread, a CUDA tensor, already inside a parallel region, few rows) an op is one chunk: the same code with
// whole-matrix BLAS calls.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <utility>
#include <vector>

namespace tuneforge {
namespace tasks {

inline at::Tensor rows_of(const at::Tensor& x) {  // (..., in) -> (M, in), a view when x is contiguous
  return x.reshape({-1, x.size(-1)});
}

// Tokens in each row: the product of the dimensions between the first and the last.
inline int64_t per_row(const at::Tensor& x) {
  int64_t L = 1;
  for (int64_t d = 1; d + 1 < x.dim(); ++d) L *= x.size(d);
  return L;
}

inline std::vector<int64_t> out_shape(const at::Tensor& x, int64_t out_features) {
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  return shape;
}

#ifdef _OPENMP
constexpr bool kThreads = true;  // at::parallel_for uses torch's threads only when this unit is built with OpenMP
#else
constexpr bool kThreads = false;
#endif
// Rows per chunk: about four chunks per thread (a delayed thread holds up a quarter of its share), within
// [256, 1024] rows. Measured at M = 4096, C = 1024 on 2 threads: 512-row chunks beat 128, 256 and 1024-2048.
constexpr int64_t kMinChunk = 256, kMaxChunk = 1024;

inline int64_t chunk_rows(int64_t M) {
  return std::clamp<int64_t>(M / (4 * at::get_num_threads()), kMinChunk, kMaxChunk);
}

// How many row chunks an op over M rows runs as (see the top of this file).
inline int64_t chunks_for(const at::Tensor& t, int64_t M) {
  if (!kThreads || !t.is_cpu() || at::get_num_threads() < 2 || at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, M / chunk_rows(M));
}

// Rows [first, first + count) of chunk i of n over M rows.
inline std::pair<int64_t, int64_t> chunk(int64_t i, int64_t n, int64_t M) {
  return {M * i / n, M * (i + 1) / n - M * i / n};
}

// task(i) for i in [0, n), each thread taking the next task when it finishes one: a thread that the OS deschedules
// (another process on the core) delays one task, not a fixed share. BLAS inside a task runs on that one thread.
// Every thread runs with the caller's thread-local state (grad mode, the dispatch keys excluded below autograd), so
// the ATen calls in a task dispatch as they would on the calling thread.
template <typename F>
void for_each_task(int64_t n, const F& task) {
  const int64_t threads = kThreads ? std::min<int64_t>(n, at::get_num_threads()) : 1;
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) task(i);
    return;
  }
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState caller;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard same(caller);
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) task(i);
  });
}

// The sum over dimension 0 of per-chunk partials (n, ...); with one chunk, the partial itself.
inline at::Tensor total(const at::Tensor& partials) {
  return partials.size(0) == 1 ? partials.select(0, 0) : partials.sum(0);
}

// The rows of each adapter, found by one stable sort of the ids (no per-adapter search), cut into pieces of at most
// `piece` rows: the tasks. order[0, unused) are the rows without an adapter (id -1).
struct Pieces {
  at::Tensor order;                    // (N,) row indices, adapter by adapter
  int64_t unused = 0;
  std::vector<int64_t> adapter, start, count;  // per piece: its adapter and its rows order[start, start + count)
  std::vector<int64_t> first, n_pieces;        // per adapter: its first piece and how many (0: no rows)
};

inline Pieces pieces(const at::Tensor& adapter_ids, int64_t n_adapters, int64_t piece) {
  TORCH_CHECK(adapter_ids.dim() == 1 && adapter_ids.scalar_type() == at::kLong,
              "tuneforge::multi_lora_linear: adapter_ids must be (N,) int64");
  Pieces p;
  p.first.assign(n_adapters, 0);
  p.n_pieces.assign(n_adapters, 0);
  const auto ids = adapter_ids.to(at::kCPU).contiguous();
  if (ids.numel() == 0) {
    p.order = ids;
    return p;
  }
  TORCH_CHECK(ids.max().item<int64_t>() < n_adapters && ids.min().item<int64_t>() >= -1,
              "tuneforge::multi_lora_linear: an adapter id is >= the ", n_adapters, " adapters given (or < -1)");
  const auto counts = at::bincount(ids + 1, {}, n_adapters + 1).contiguous();  // slot 0: rows without one
  const int64_t* c = counts.data_ptr<int64_t>();
  p.order = at::argsort(ids, /*stable=*/true);  // the rows with id -1 sort first
  p.unused = c[0];
  int64_t s = c[0];
  for (int64_t a = 0; a < n_adapters; ++a) {
    p.first[a] = static_cast<int64_t>(p.adapter.size());
    for (int64_t done = 0; done < c[a + 1]; done += piece) {
      p.adapter.push_back(a);
      p.start.push_back(s + done);
      p.count.push_back(std::min(piece, c[a + 1] - done));
    }
    p.n_pieces[a] = static_cast<int64_t>(p.adapter.size()) - p.first[a];
    s += c[a + 1];
  }
  return p;
}

// Copy rows (each `bytes` long) between a (N, ...) tensor and a packed buffer: dst[i] = src[rows[i]] (gather) or
// dst[rows[i]] = src[i] (scatter). Both contiguous, on the CPU.
inline void gather(const at::Tensor& src, const int64_t* rows, int64_t n, at::Tensor& dst) {
  const int64_t bytes = src.numel() ? src.nbytes() / src.size(0) : 0;
  const auto* s = static_cast<const char*>(src.data_ptr());
  auto* d = static_cast<char*>(dst.data_ptr());
  for (int64_t i = 0; i < n; ++i) std::memcpy(d + i * bytes, s + rows[i] * bytes, bytes);
}

inline void scatter(const at::Tensor& src, const int64_t* rows, int64_t n, at::Tensor& dst) {
  const int64_t bytes = dst.numel() ? dst.nbytes() / dst.size(0) : 0;
  const auto* s = static_cast<const char*>(src.data_ptr());
  auto* d = static_cast<char*>(dst.data_ptr());
  for (int64_t i = 0; i < n; ++i) std::memcpy(d + rows[i] * bytes, s + i * bytes, bytes);
}

// dst[rows[i]] = 0 for i < n (all-zero bytes are 0 in every floating type).
inline void zero_rows(const int64_t* rows, int64_t n, at::Tensor& dst) {
  const int64_t bytes = dst.numel() ? dst.nbytes() / dst.size(0) : 0;
  auto* d = static_cast<char*>(dst.data_ptr());
  for (int64_t i = 0; i < n; ++i) std::memset(d + rows[i] * bytes, 0, bytes);
}

// Rows per piece: about a chunk of tokens when tasks run side by side, else each adapter's rows in one piece.
inline int64_t piece_rows(const at::Tensor& x, int64_t N, int64_t L) {
  const int64_t tokens = N * L;
  if (chunks_for(x, tokens) == 1) return std::max<int64_t>(N, 1);
  return std::max<int64_t>(1, chunk_rows(tokens) / std::max<int64_t>(L, 1));
}


}  // namespace tasks
}  // namespace tuneforge
