// The element-wise passes over weight-shaped tensors: W / sigma (the forward's last phase), <G, W_sn> and
// (G - lambda u v^T) / sigma (the backward). Each walks a range [begin, end) of one layer's elements (a virtual
// block's piece: block_walk::piece_of), forward or, where the phase before read the same tensor, reversed: the data
// read last is read first, from L2 while it is still there. Contiguous, 16-byte aligned tensors (packable) move
// 16-byte packs, kStreamPacks per thread and tensor loaded before any is used (stores after all the loads of a step);
// other views one element at a time, through the index math of their (outer, rows, inner) views (index_t: 32-bit
// where the element count allows, several times cheaper per division; offsets stay 64-bit).
#pragma once

#include "common.cuh"

namespace sn_ext {
namespace {

using block_walk::kStreamPacks;
using block_walk::kStreamPairPacks;

template <typename index_t>
struct Index3d {
  index_t o, i, r;
};

template <typename index_t>
__device__ __forceinline__ Index3d<index_t> unflatten(index_t e, index_t rows, index_t inner) {
  const index_t line = e / inner;
  return {line / rows, line % rows, e - line * inner};
}

// The packs of [begin, end) whole inside it (begin is a whole number of packs: block_walk::piece_chunk aligns it),
// walked kPacks per thread at a time: thread t's step `base` takes the packs at positions base + q * kThreads,
// q < kPacks (those below count()), position idx being pack first + idx, or last - 1 - idx walking back
// (kReversed). A step's packs are one pointer apart by constant offsets: one address per tensor.
template <bool kReversed, int kPacks = kStreamPacks>
struct PackRange {
  static constexpr int kStepPacks = kPacks;
  int64_t first, last;
  __device__ int64_t count() const { return last - first; }
  // The pack at position base, and the offset (in packs) of position base + q * kThreads from it.
  __device__ int64_t at(int64_t base) const { return kReversed ? last - 1 - base : first + base; }
  static constexpr int64_t step(int q) { return kReversed ? -int64_t(q) * kThreads : int64_t(q) * kThreads; }
  __device__ bool has(int64_t base, int q) const { return base + q * kThreads < count(); }
};

// This thread's steps over a PackRange: step(base) for base = thread_x(), + kPacks * kThreads, ...
template <typename Range, typename Step>
__device__ __forceinline__ void for_each_stream_step(const Range& range, const Step& step) {
#pragma unroll 1  // a step already has kStreamPacks loads per tensor in flight: more would spill
  for (int64_t base = thread_x(); base < range.count(); base += int64_t(Range::kStepPacks) * kThreads) step(base);
}

// The elements of [begin, end) after its last whole pack, one per thread: only the tensor's last piece has any (an
// empty piece past the end, [n, n), has none).
template <int kSize, typename Body>
__device__ __forceinline__ void for_each_tail_element(int64_t begin, int64_t end, const Body& body) {
  const int64_t tail = end / kSize * kSize;
  for (int64_t e = (tail > begin ? tail : begin) + thread_x(); e < end; e += kThreads) body(e);
}

// W_sn = W / sigma in op-math (as torch's `weight / sigma`) over [begin, end). `packed`: both views contiguous and
// aligned.
template <bool kReversed, typename scalar_t, typename acc_t, typename index_t>
__device__ void divide_range(const scalar_t* __restrict__ w, const View3d& wv, scalar_t* __restrict__ out,
                             const View3d& ov, acc_t sigma, bool packed, int64_t begin, int64_t end) {
  const auto divided = [&](scalar_t x) { return static_cast<scalar_t>(static_cast<acc_t>(x) / sigma); };
  if (packed) {
    using P = Pack<scalar_t>;
    const PackRange<kReversed> range{begin / P::kSize, end / P::kSize};
    for_each_stream_step(range, [&](int64_t base) {
      const P* wp = reinterpret_cast<const P*>(w) + range.at(base);
      P* op = reinterpret_cast<P*>(out) + range.at(base);
      P a[kStreamPacks];
#pragma unroll
      for (int q = 0; q < kStreamPacks; ++q) a[q] = range.has(base, q) ? wp[range.step(q)] : P{};
#pragma unroll
      for (int q = 0; q < kStreamPacks; ++q) {
        if (!range.has(base, q)) continue;
        P b;
#pragma unroll
        for (int j = 0; j < P::kSize; ++j) b.val[j] = divided(a[q].val[j]);
        op[range.step(q)] = b;
      }
    });
    for_each_tail_element<P::kSize>(begin, end, [&](int64_t e) { out[e] = divided(w[e]); });
    return;
  }
  const index_t rows = static_cast<index_t>(wv.rows), inner = static_cast<index_t>(wv.inner);
  for (int64_t idx = thread_x(); idx < end - begin; idx += kThreads) {
    const index_t e = static_cast<index_t>(kReversed ? end - 1 - idx : begin + idx);
    const Index3d<index_t> k = unflatten(e, rows, inner);
    out[ov.offset(k.o, k.i, k.r)] = divided(w[wv.offset(k.o, k.i, k.r)]);
  }
}

// This thread's share of <G, W_sn> over [begin, end) (the caller adds the threads' shares: block_sum). `packed`: both
// views contiguous and aligned (the split of the sum then follows the packs: deterministic all the same).
template <typename scalar_t, typename acc_t, typename index_t>
__device__ acc_t lambda_range(const scalar_t* g, const View3d& gv, const scalar_t* s, const View3d& sv, bool packed,
                              int64_t begin, int64_t end) {
  acc_t sum = 0;
  if (packed) {
    using P = Pack<scalar_t>;
    constexpr int kPacks = kStreamPairPacks;
    const PackRange<false, kPacks> range{begin / P::kSize, end / P::kSize};
    for_each_stream_step(range, [&](int64_t base) {
      const P* gp = reinterpret_cast<const P*>(g) + range.at(base);
      const P* sp = reinterpret_cast<const P*>(s) + range.at(base);
      P a[kPacks], b[kPacks];
#pragma unroll
      for (int q = 0; q < kPacks; ++q) {
        a[q] = range.has(base, q) ? gp[range.step(q)] : P{};
        b[q] = range.has(base, q) ? sp[range.step(q)] : P{};
      }
#pragma unroll
      for (int q = 0; q < kPacks; ++q) {
        if (!range.has(base, q)) continue;
#pragma unroll
        for (int j = 0; j < P::kSize; ++j) sum += static_cast<acc_t>(a[q].val[j]) * static_cast<acc_t>(b[q].val[j]);
      }
    });
    for_each_tail_element<P::kSize>(begin, end,
                                    [&](int64_t e) { sum += static_cast<acc_t>(g[e]) * static_cast<acc_t>(s[e]); });
    return sum;
  }
  const index_t rows = static_cast<index_t>(gv.rows), inner = static_cast<index_t>(gv.inner);
  for (int64_t e = begin + thread_x(); e < end; e += kThreads) {
    const Index3d<index_t> k = unflatten(static_cast<index_t>(e), rows, inner);
    sum += static_cast<acc_t>(g[gv.offset(k.o, k.i, k.r)]) * static_cast<acc_t>(s[sv.offset(k.o, k.i, k.r)]);
  }
  return sum;
}

// grad_W = (G - lambda u v^T) / sigma over [begin, end), in the CPU kernel's operation order. `packed`: G's and the
// output's views contiguous and aligned (packable). v_order: where the views hold their columns out of torch's order
// (block_walk::ColumnOrder), v's element of each. A pack's rows and columns: where a line (inner elements) is a
// whole number of packs, one division per pack finds its row i and first column, and v's values are one 16-byte load
// where v is contiguous and aligned; else each element's (a pack may span two lines). The packs of G are loaded
// first; each pack's u and v values (vectors every block reads: L1) then wait for the pack before's store.
template <bool kReversed, typename scalar_t, typename acc_t, typename index_t>
__device__ void correction_range(const scalar_t* g, const View3d& gv, scalar_t* out, const View3d& ov,
                                 const scalar_t* u, int64_t u_stride, const scalar_t* v, int64_t v_stride,
                                 const block_walk::ColumnOrder& v_order, acc_t lambda, acc_t sigma, bool packed,
                                 int64_t begin, int64_t end) {
  const index_t rows = static_cast<index_t>(gv.rows), inner = static_cast<index_t>(gv.inner);
  const auto v_at = [&](int64_t col) { return v[v_order.logical(col) * v_stride]; };
  const auto corrected = [&](scalar_t g_e, acc_t lambda_u, int64_t col) {
    return static_cast<scalar_t>((static_cast<acc_t>(g_e) - lambda_u * static_cast<acc_t>(v_at(col))) / sigma);
  };
  if (packed) {
    using P = Pack<scalar_t>;
    const PackRange<kReversed> range{begin / P::kSize, end / P::kSize};
    const bool line_packs = inner % P::kSize == 0;
    // Pack k's row i (for u) and first column (for v), where it lies in one line.
    const auto locate = [&](int64_t k, int64_t& i, int64_t& col0) {
      const index_t e0 = static_cast<index_t>(k * P::kSize);
      const index_t line = e0 / inner;
      const index_t o = line / rows;
      i = static_cast<int64_t>(line - o * rows);
      col0 = static_cast<int64_t>(o) * inner + static_cast<int64_t>(e0 - line * inner);
    };
    // v's values for a pack in one line: one 16-byte load where v is contiguous and aligned (col0 is a whole number
    // of packs).
    const bool v_packs = v_stride == 1 && v_order.in_order() && reinterpret_cast<uintptr_t>(v) % sizeof(P) == 0;
    const auto v_pack = [&](int64_t col0) {
      if (v_packs) return *reinterpret_cast<const P*>(v + col0);
      P values;
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) values.val[j] = v_at(col0 + j);
      return values;
    };
    for_each_stream_step(range, [&](int64_t base) {
      const P* gp = reinterpret_cast<const P*>(g) + range.at(base);
      P* op = reinterpret_cast<P*>(out) + range.at(base);
      P a[kStreamPacks];
#pragma unroll
      for (int q = 0; q < kStreamPacks; ++q) a[q] = range.has(base, q) ? gp[range.step(q)] : P{};
#pragma unroll
      for (int q = 0; q < kStreamPacks; ++q) {
        if (!range.has(base, q)) continue;
        const int64_t k = range.at(base) + range.step(q);
        P b;
        if (line_packs) {
          int64_t i, col0;
          locate(k, i, col0);
          const acc_t lambda_u = lambda * static_cast<acc_t>(u[i * u_stride]);
          const P vs = v_pack(col0);
#pragma unroll
          for (int j = 0; j < P::kSize; ++j)
            b.val[j] = static_cast<scalar_t>(
                (static_cast<acc_t>(a[q].val[j]) - lambda_u * static_cast<acc_t>(vs.val[j])) / sigma);
        } else {
#pragma unroll
          for (int j = 0; j < P::kSize; ++j) {
            const Index3d<index_t> e = unflatten(static_cast<index_t>(k * P::kSize + j), rows, inner);
            const acc_t lambda_u = lambda * static_cast<acc_t>(u[static_cast<int64_t>(e.i) * u_stride]);
            b.val[j] = corrected(a[q].val[j], lambda_u, static_cast<int64_t>(e.o) * inner + e.r);
          }
        }
        op[range.step(q)] = b;
      }
    });
    // The tail: the elements after the last whole pack (only the tensor's last piece has any).
    for_each_tail_element<P::kSize>(begin, end, [&](int64_t e) {
      const Index3d<index_t> k = unflatten(static_cast<index_t>(e), rows, inner);
      const acc_t lambda_u = lambda * static_cast<acc_t>(u[static_cast<int64_t>(k.i) * u_stride]);
      out[e] = corrected(g[e], lambda_u, static_cast<int64_t>(k.o) * inner + k.r);
    });
    return;
  }
  for (int64_t idx = thread_x(); idx < end - begin; idx += kThreads) {
    const index_t e = static_cast<index_t>(kReversed ? end - 1 - idx : begin + idx);
    const Index3d<index_t> k = unflatten(e, rows, inner);
    const acc_t lambda_u = lambda * static_cast<acc_t>(u[static_cast<int64_t>(k.i) * u_stride]);
    const int64_t col = static_cast<int64_t>(k.o) * gv.inner + k.r;
    out[ov.offset(k.o, k.i, k.r)] = corrected(g[gv.offset(k.o, k.i, k.r)], lambda_u, col);
  }
}

}  // namespace
}  // namespace sn_ext
