// Device code and launch plans of the CUDA kernels (spectral_normalize_cuda.cu, spectral_normalize_backward_cuda.cu):
// every op, per layer or grouped, is one persistent kernel. Each phase is a __device__ function of its block
// coordinates that assumes a 1-D block of kThreads threads (the one-block vector phases take any block size); the
// kernel loops over a phase's virtual blocks, and runs its phases in one launch separated by barriers or, phased,
// one launch per phase (launch_steps).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../matrix_view.h"
#include "block_walk.h"
#include "kernels.h"
#include "launch.h"

namespace sn_ext {
namespace {

// Threads per block, for every phase. The one-block phases (normalize a split vector, sum lambda's partials) run
// with it too: a block sum's order depends on the block size, so one size makes a layer's bits the same whether it
// is launched alone or in a group.
constexpr int kThreads = 256;
// Blocks per SM the kernels are compiled for (__launch_bounds__): at most 65536 / (3 * 256) = 85 registers per
// thread, which the kernels fit without spilling (64, the next step up, made ptxas spill; tests/test_cuda_sass.py).
constexpr int kMinBlocksPerSm = 3;
// About how many blocks a matvec should have to fill an H100/H200 (132 SMs). A constant, not the device's SM
// count, so the reduction split (and so every result bit) depends on the shape only.
constexpr int64_t kTargetBlocks = 256;
// Smallest piece of a row (matvec) or column (W^T matvec, per thread) worth a block of its own: below this the
// extra partial sums cost more than the parallelism gains.
constexpr int64_t kMinColsPerSplit = 2048;
constexpr int64_t kMinRowsPerThread = 8;
constexpr int64_t kMaxGridY = 65535;
// lambda's partial sums: at most four per thread of the one-block total, so that the first stage can keep a whole
// H100/H200 busy (3 x 132 resident blocks); the split depends on the shape alone.
constexpr int64_t kMaxLambdaBlocks = 4 * kThreads;
constexpr int64_t kLambdaItemsPerThread = 8;
// Layers per launch. Their plans travel as one kernel parameter: a per-layer op passes one layer (a few hundred
// bytes), a grouped op up to kGroupLayers per launch, a parameter block under 4 KB (static_asserts in the kernel
// files): the limit every launch path has always accepted (CUDA 12.1 raised it to 32 KB for ordinary launches, and
// nothing documents the larger blocks for cooperative ones). A larger group takes one launch per kGroupLayers.
constexpr int kGroupLayers = 12;
constexpr size_t kMaxParameterBytes = 4096;
// Size classes. A launch whose layers have at most kOneBlockMaxNumel elements in all runs in one block: its phases
// are separated by __syncthreads, with no grid-wide barrier and no cooperative launch. A larger one gets a grid
// sized by its work, kElementsPerThread elements per thread (fewer blocks to wait for at each grid barrier), at
// most what the largest phase can use and what fits on the device at once; the phases' virtual blocks are walked
// by that grid, so the split of every sum (and every result bit) depends on the shapes alone.
constexpr int64_t kOneBlockMaxNumel = int64_t(1) << 16;
constexpr int64_t kElementsPerThread = 8;

using block_walk::ceil_div;

// Smallest power of 2 >= n, capped at `cap` (a power of 2).
int pow2_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) p <<= 1;
  return p;
}

// A weight-shaped tensor as (outer, rows, inner) with its strides: Wm[i, o * inner + r] = W3[o][i][r].
struct View3d {
  int64_t outer, rows, inner;
  int64_t s_outer, s_row, s_inner;
  __host__ __device__ int64_t cols() const { return outer * inner; }
  __host__ __device__ int64_t offset(int64_t o, int64_t i, int64_t r) const {
    return o * s_outer + i * s_row + r * s_inner;
  }
};

View3d view_of(const at::Tensor& t3) {
  return {t3.size(0), t3.size(1), t3.size(2), t3.stride(0), t3.stride(1), t3.stride(2)};
}

// 16 bytes of a contiguous, 16-byte aligned tensor: one LDG.E.128 / STG.E.128 (the packed paths below).
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t val[kSize];
};

// ---------------------------------------------------------------------------------------------------------------
// Reductions inside a block (fixed shuffle and tree patterns: deterministic for a given block size)

// Sum over aligned groups of `width` lanes (a power of 2 <= 32); the total lands in each group's first lane.
// Every lane of the warp must call it.
template <typename T>
__device__ __forceinline__ T group_sum(T value, int width) {
  for (int offset = width / 2; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset, width);
  return value;
}

// Sum over the whole (1-D) block, returned to every thread. `scratch` holds 32 values; every thread must call it.
template <typename T>
__device__ T block_sum(T value, T* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  value = group_sum(value, 32);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < warps ? scratch[lane] : T(0);
    value = group_sum(value, 32);
    if (lane == 0) scratch[0] = value;
  }
  __syncthreads();
  value = scratch[0];
  __syncthreads();  // scratch may be reused by the caller
  return value;
}

// value(j) for j in [0, count) added in a fixed order (thread t adds t, t + blockDim.x, ..., then block_sum), returned
// to every thread: every block that calls it on the same values gets the same bits (lambda's total; the fused round's
// norms, computed by every block that needs them instead of by one block and a barrier). Every thread must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t* ordered_sum_scratch() {  // one buffer per sum type, not per caller's `value`
  __shared__ acc_t scratch[32];
  return scratch;
}

template <typename Value>
__device__ auto ordered_sum_block(int64_t count, const Value& value) {
  using acc_t = decltype(value(int64_t{0}));
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) sum += value(j);
  return block_sum(sum, ordered_sum_scratch<acc_t>());
}

template <typename acc_t>
__device__ __forceinline__ bool usable(acc_t norm) {
  return isfinite(norm) && norm > acc_t(0);
}

// The denominator of a normalization: max(norm, eps), but not fmax: a NaN norm must stay NaN, as std::max(norm, eps)
// on the CPU.
template <typename acc_t>
__device__ __forceinline__ acc_t norm_denominator(acc_t norm, acc_t eps) {
  return norm < eps ? eps : norm;
}

// The barrier between two phases of one launch: the whole grid's (a cooperative launch), or only the block's when
// the launch has one block (__syncthreads also makes the block's global-memory writes visible to the block).
__device__ __forceinline__ void phase_barrier(bool one_block) {
  if (one_block) {
    __syncthreads();
  } else {
    cooperative_groups::this_grid().sync();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// A launch's layers

// Every phase's walk over its virtual blocks: this block takes b = blockIdx.x, + gridDim.x, ... < total, and calls
// body(layer, local) for each, where layer owns b (its blocks start at layer.*first) and local = b - layer.*first is
// the block's index within the layer (block_walk.h, whose index math csrc/tests/test_block_walk.cpp checks on the
// CPU). A body that uses shared memory ends with __syncthreads: the next virtual block reuses it.
template <typename Layer, typename Body>
__device__ __forceinline__ void for_each_virtual_block(const Layer* layers, int count, int64_t Layer::* first,
                                                       int64_t total, const Body& body) {
  block_walk::walk_virtual_blocks(layers, count, first, total, blockIdx.x, gridDim.x, body);
}

// ---------------------------------------------------------------------------------------------------------------
// Phase 1 of a half-step: split matrix-vector products. Each writes partial sums (splits, length); the one-block
// vector phase adds the splits in order. Splitting the reduced dimension keeps short-and-wide (1 x N) and
// tall-and-narrow (N x 1) matrices from running on a handful of threads.

template <typename scalar_t, typename acc_t>
struct MatvecArgs {
  const scalar_t* w;  // the weight, through `view`
  View3d view;
  const scalar_t* x;  // (cols,) with stride x_stride
  int64_t x_stride;
  acc_t* partial;  // (splits, rows): partial[s * rows + i] = sum over split s's columns c of Wm[i, c] x[c]
  int lanes;       // threads per row: a power of 2 <= kThreads; kThreads / lanes rows per block
  int64_t chunk;   // columns per split (a whole number of packs for matvec_block's packed loop: plan_matvec)
};

// The end of a matvec block: a row's threads' sums added (a fixed shuffle tree, then the warps in order) and
// stored as the row's partial sum of this split. Every thread of the block must call it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_row_sum(const MatvecArgs<scalar_t, acc_t>& a, acc_t sum, int64_t i, int tx,
                                              int ty, int64_t split) {
  __shared__ acc_t warp_sums[kThreads / 32];
  const int lanes = a.lanes;
  sum = group_sum(sum, std::min(lanes, 32));
  if (lanes > 32) {  // a row spans several warps: add their sums in warp order
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
    __syncthreads();
    if (tx == 0) {
      const int per_row = lanes / 32;
      sum = 0;
      for (int k = 0; k < per_row; ++k) sum += warp_sums[ty * per_row + k];
    }
  }
  if (tx == 0 && i < a.view.rows) a.partial[split * a.view.rows + i] = sum;
}

// y = Wm x, the scalar loop (SN_EXT_CUDA_ROUND=split-scalar, and the strided views of the split round): threads of
// a row walk consecutive columns, so a contiguous row is read coalesced; one load in flight per thread.
template <typename scalar_t, typename acc_t>
__device__ void matvec_block_scalar(const MatvecArgs<scalar_t, acc_t>& a, int64_t row_block, int64_t split) {
  const View3d& m = a.view;
  const int lanes = a.lanes;
  const int tx = threadIdx.x % lanes, ty = threadIdx.x / lanes;
  const int64_t i = row_block * (kThreads / lanes) + ty;
  const int64_t c_begin = split * a.chunk, c_end = std::min(m.cols(), c_begin + a.chunk);
  acc_t sum = 0;
  if (i < m.rows) {
    const scalar_t* w_row = a.w + i * m.s_row;
    int64_t c = c_begin + tx;
    // Column c is (o, r) = divmod(c, inner); stepping by `lanes` is tracked without a division per element.
    int64_t o = c / m.inner, r = c - o * m.inner;
    const int64_t step_o = lanes / m.inner, step_r = lanes % m.inner;
    for (; c < c_end; c += lanes) {
      sum += static_cast<acc_t>(w_row[o * m.s_outer + r * m.s_inner]) * static_cast<acc_t>(a.x[c * a.x_stride]);
      r += step_r;
      o += step_o;
      if (r >= m.inner) {
        r -= m.inner;
        ++o;
      }
    }
  }
  store_row_sum(a, sum, i, tx, ty, split);
}

// The split round's loops over 16-byte packs (matvec_block, rmatvec_block): how many packs of W a thread loads before
// it uses any (64 bytes in flight per thread; the scalar loops had one element). matvec_block also loads as many
// packs of x: for the 2-byte dtypes, whose x values take twice the registers once converted to float, half as many
// (4 made ptxas spill the bfloat16 kernels).
constexpr int kSplitUnroll = 4;

__host__ __device__ constexpr int matvec_unroll(int pack) {
  return pack == 8 ? kSplitUnroll / 2 : kSplitUnroll;
}

// y = Wm x, the split round's loop: with 16-byte loads where `packed` (W's rows contiguous and 16-byte aligned and cols
// a whole number of packs: rows_packable, checked on the host, which also makes every split's chunk a whole number
// of packs: plan_matvec) and x contiguous and aligned (checked here: the input v may be any view); else the scalar
// loop. Thread tx of a row reads packs tx, tx + lanes, ... of its split kSplitUnroll at a time, W's and x's, into as
// many independent sums, added in a fixed order at the end: deterministic. No index arithmetic beyond a pack index.
template <typename scalar_t, typename acc_t>
__device__ void matvec_block(const MatvecArgs<scalar_t, acc_t>& a, bool packed, int64_t row_block, int64_t split) {
  using P = Pack<scalar_t>;
  if (!packed || a.x_stride != 1 || reinterpret_cast<uintptr_t>(a.x) % sizeof(P) != 0) {
    matvec_block_scalar(a, row_block, split);
    return;
  }
  constexpr int kUnroll = matvec_unroll(P::kSize);
  const View3d& m = a.view;
  const int lanes = a.lanes;
  const int tx = threadIdx.x % lanes, ty = threadIdx.x / lanes;
  const int64_t i = row_block * (kThreads / lanes) + ty;
  const int64_t k_end = std::min(m.cols(), (split + 1) * a.chunk) / P::kSize;
  acc_t sums[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) sums[u] = 0;
  if (i < m.rows) {
    const P* w_row = reinterpret_cast<const P*>(a.w + i * m.s_row);
    const P* x = reinterpret_cast<const P*>(a.x);
    const auto add = [](acc_t& sum, const P& w, const P& xs) {
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) sum += static_cast<acc_t>(w.val[j]) * static_cast<acc_t>(xs.val[j]);
    };
    int64_t k = split * a.chunk / P::kSize + tx;
    for (; k + (kUnroll - 1) * lanes < k_end; k += kUnroll * lanes) {
      P w[kUnroll], xs[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        w[u] = w_row[k + u * lanes];
        xs[u] = x[k + u * lanes];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) add(sums[u], w[u], xs[u]);
    }
    // Fewer than kUnroll packs left: each into its own sum (a constant index: the sums stay in registers).
#pragma unroll
    for (int u = 0; u < kUnroll - 1; ++u) {
      if (k + u * lanes < k_end) add(sums[u], w_row[k + u * lanes], x[k + u * lanes]);
    }
  }
  acc_t sum = sums[0];
#pragma unroll
  for (int u = 1; u < kUnroll; ++u) sum += sums[u];
  store_row_sum(a, sum, i, tx, ty, split);
}

template <typename scalar_t, typename acc_t>
struct RmatvecArgs {
  const scalar_t* w;  // the weight, through `view`
  View3d view;
  const scalar_t* y;  // (rows,) with stride y_stride
  int64_t y_stride;
  acc_t* partial;  // (splits, cols): partial[s * cols + c] = sum over split s's rows i of Wm[i, c] y[i]
  int lanes;      // threads per column group (per pack group in rmatvec_block's packed loop): a power of 2 <= kThreads;
                  // kThreads / lanes threads per column
  int64_t chunk;  // rows per split
};

// z = Wm^T y, the scalar loop (SN_EXT_CUDA_ROUND=split-scalar, and the split round's views that rmatvec_block cannot
// read in packs). Adjacent threads own adjacent columns (coalesced for a contiguous row); when there are fewer
// columns than threads, several threads share a column and their sums are added in a fixed tree.
template <typename scalar_t, typename acc_t>
__device__ void rmatvec_block_scalar(const RmatvecArgs<scalar_t, acc_t>& a, int64_t col_block, int64_t split) {
  __shared__ acc_t sums[kThreads];
  const View3d& m = a.view;
  const int lanes = a.lanes, row_lanes = kThreads / lanes;
  const int tx = threadIdx.x % lanes, ty = threadIdx.x / lanes;
  const int64_t cols = m.cols();
  const int64_t c = col_block * lanes + tx;
  const int64_t i_begin = split * a.chunk, i_end = std::min(m.rows, i_begin + a.chunk);
  acc_t sum = 0;
  if (c < cols) {
    const int64_t o = c / m.inner, r = c - o * m.inner;
    const scalar_t* w_col = a.w + o * m.s_outer + r * m.s_inner;
#pragma unroll 4
    for (int64_t i = i_begin + ty; i < i_end; i += row_lanes)
      sum += static_cast<acc_t>(w_col[i * m.s_row]) * static_cast<acc_t>(a.y[i * a.y_stride]);
  }
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int half = row_lanes / 2; half > 0; half >>= 1) {
    if (ty < half) sums[threadIdx.x] += sums[threadIdx.x + half * lanes];
    __syncthreads();
  }
  if (ty == 0 && c < cols) a.partial[split * cols + c] = sums[tx];
}

// z = Wm^T y, the split round's loop: with 16-byte loads where `packed` (rows_packable, checked on the host;
// plan_rmatvec then counts its threads in packs), else the scalar loop. Thread tx owns pack col_block * lanes + tx of
// every row (P::kSize adjacent columns, a sum each) and walks its split's rows ty, ty + kThreads / lanes, ..., loading
// kSplitUnroll rows' packs before it adds them, in row order (the order of a loop without unrolling); the threads that
// share a pack add their sums in a fixed tree, as rmatvec_block_scalar. No index arithmetic beyond pointer adds.
template <typename scalar_t, typename acc_t>
__device__ void rmatvec_block(const RmatvecArgs<scalar_t, acc_t>& a, bool packed, int64_t col_block, int64_t split) {
  if (!packed) {
    rmatvec_block_scalar(a, col_block, split);
    return;
  }
  using P = Pack<scalar_t>;
  __shared__ acc_t tree[P::kSize][kThreads];
  const View3d& m = a.view;
  const int lanes = a.lanes, row_lanes = kThreads / lanes;
  const int tx = threadIdx.x % lanes, ty = threadIdx.x / lanes;
  const int64_t cols = m.cols(), k = col_block * lanes + tx;
  const int64_t i_end = std::min(m.rows, (split + 1) * a.chunk);
  acc_t sums[P::kSize];
#pragma unroll
  for (int j = 0; j < P::kSize; ++j) sums[j] = 0;
  if (k < cols / P::kSize) {
    int64_t i = split * a.chunk + ty;
    // Row i's pack k is at w[i * row_packs + k]; a view of one row may have any s_row, but only row 0 is read then.
    const int64_t row_packs = m.rows == 1 ? 0 : m.s_row / P::kSize;
    const P* w = reinterpret_cast<const P*>(a.w) + i * row_packs + k;
    const scalar_t* y = a.y + i * a.y_stride;
    const int64_t w_step = row_lanes * row_packs, y_step = row_lanes * a.y_stride;
    const auto add = [&](const P& wi, acc_t yi) {
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) sums[j] += static_cast<acc_t>(wi.val[j]) * yi;
    };
    for (; i + (kSplitUnroll - 1) * row_lanes < i_end; i += kSplitUnroll * row_lanes) {
      P wi[kSplitUnroll];
      acc_t yi[kSplitUnroll];
#pragma unroll
      for (int u = 0; u < kSplitUnroll; ++u) {
        wi[u] = w[u * w_step];
        yi[u] = static_cast<acc_t>(y[u * y_step]);
      }
#pragma unroll
      for (int u = 0; u < kSplitUnroll; ++u) add(wi[u], yi[u]);
      w += kSplitUnroll * w_step;
      y += kSplitUnroll * y_step;
    }
    for (; i < i_end; i += row_lanes, w += w_step, y += y_step) add(*w, static_cast<acc_t>(*y));
  }
#pragma unroll
  for (int j = 0; j < P::kSize; ++j) tree[j][threadIdx.x] = sums[j];
  __syncthreads();
  for (int half = row_lanes / 2; half > 0; half >>= 1) {
    if (ty < half) {
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) tree[j][threadIdx.x] += tree[j][threadIdx.x + half * lanes];
    }
    __syncthreads();
  }
  if (ty == 0 && k < cols / P::kSize) {
#pragma unroll
    for (int j = 0; j < P::kSize; ++j) a.partial[split * cols + k * P::kSize + j] = tree[j][tx];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Phase 2 of a half-step, one block: add the splits, normalize, and (last half-step) finish.

template <typename scalar_t>
struct Vectors {
  const scalar_t* u_in;  // the caller's u (rows,), stride u_stride
  int64_t u_stride;
  const scalar_t* v_in;  // the caller's v (cols,), stride v_stride
  int64_t v_stride;
  scalar_t* u_work;    // contiguous (rows,): the rounds' u, in the weight's dtype like torch's buffers
  scalar_t* v_work;    // contiguous (cols,)
  scalar_t* u_commit;  // power_iteration_: the caller's u, writable (same memory as u_in); else nullptr
  scalar_t* v_commit;
  int64_t rows, cols;
};

template <typename scalar_t, typename acc_t>
struct NormalizeArgs {
  acc_t* partial;  // (splits, n) partial sums of the raw vector; the block leaves the raw vector in row 0
  int64_t n, splits;
  scalar_t* out;  // (n,) contiguous: raw / max(|raw|, eps), rounded to the weight's dtype
  acc_t eps;
  int* degenerate;  // device flag: some round met a non-finite or zero norm
  bool first;       // the first half-step of the call: starts the flag instead of adding to it
  acc_t* sigma;     // last half-step only (else nullptr): sigma = s^2 / max(s, eps), s = |raw|
  Finish finish;
  Vectors<scalar_t> vectors;
  // The raw vector is the splits' sum divided by this: 1 (exact) but for v in a fused round, whose raw vector is
  // W^T u = (W^T y) / max(|y|, eps) (fused_round_block).
  acc_t divisor;
};

template <typename scalar_t>
__device__ void copy_vector(scalar_t* dst, int64_t dst_stride, const scalar_t* src, int64_t src_stride, int64_t n) {
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dst[j * dst_stride] = src[j * src_stride];
}

// Returns |raw| to every thread.
template <typename scalar_t, typename acc_t>
__device__ acc_t normalize_block(const NormalizeArgs<scalar_t, acc_t>& a) {
  __shared__ acc_t scratch[32];
  __shared__ int bad;
  acc_t sq = 0;
  for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) {
    acc_t raw = 0;
    for (int64_t s = 0; s < a.splits; ++s) raw += a.partial[s * a.n + j];
    raw /= a.divisor;
    a.partial[j] = raw;  // read back below by this same thread
    sq += raw * raw;
  }
  const acc_t norm = sqrt(block_sum(sq, scratch));
  const acc_t denom = norm_denominator(norm, a.eps);
  for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) a.out[j] = static_cast<scalar_t>(a.partial[j] / denom);
  if (threadIdx.x == 0) {
    bad = (a.first ? 0 : *a.degenerate) | (usable(norm) ? 0 : 1);
    *a.degenerate = bad;
    if (a.sigma != nullptr) *a.sigma = norm * norm / denom;
  }
  if (a.finish == Finish::kNone) return norm;
  __syncthreads();  // `bad`, and this block's writes to `out`, are visible to the whole block
  const Vectors<scalar_t>& v = a.vectors;
  if ((a.finish == Finish::kRestore || a.finish == Finish::kBoth) && bad) {
    copy_vector(v.u_work, 1, v.u_in, v.u_stride, v.rows);
    copy_vector(v.v_work, 1, v.v_in, v.v_stride, v.cols);
  } else if ((a.finish == Finish::kCommit || a.finish == Finish::kBoth) && !bad) {
    copy_vector(v.u_commit, v.u_stride, v.u_work, 1, v.rows);
    copy_vector(v.v_commit, v.v_stride, v.v_work, 1, v.cols);
  }
  return norm;
}

// ---------------------------------------------------------------------------------------------------------------
// Elementwise passes over W-shaped tensors. index_t is uint32_t when the element count allows: the two
// divisions per element that recover (o, i, r) are several times cheaper in 32 bits. Offsets stay 64-bit.

template <typename index_t>
struct Index3d {
  index_t o, i, r;
};

template <typename index_t>
__device__ __forceinline__ Index3d<index_t> unflatten(index_t e, index_t rows, index_t inner) {
  const index_t line = e / inner;
  return {line / rows, line % rows, e - line * inner};
}

// The phases below take a block's share of the work as (block, blocks): the elements e = block * kThreads + t,
// + blocks * kThreads, ... (a grid-stride loop over `blocks` blocks, real or virtual), so a split depends on the
// shape alone.

// n == 0: sigma = u^T (W v) from the matvec's partial sums; the vectors used (u_used, v_used) are the inputs.
template <typename scalar_t, typename acc_t>
__device__ void dot_block(const acc_t* partial, int64_t splits, const Vectors<scalar_t>& v, acc_t* sigma,
                          bool copy_inputs) {
  __shared__ acc_t scratch[32];
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < v.rows; i += blockDim.x) {
    acc_t raw = 0;
    for (int64_t s = 0; s < splits; ++s) raw += partial[s * v.rows + i];
    sum += static_cast<acc_t>(v.u_in[i * v.u_stride]) * raw;
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) *sigma = sum;
  if (copy_inputs) {
    copy_vector(v.u_work, 1, v.u_in, v.u_stride, v.rows);
    copy_vector(v.v_work, 1, v.v_in, v.v_stride, v.cols);
  }
}

// Contiguous fast paths. When the weight-shaped tensors of a pass are contiguous and 16-byte aligned (checked on the
// host: packable()), the elementwise passes move 16 bytes per access (LDG.E.128 / STG.E.128), two accesses in flight
// per thread, with no index arithmetic per element: element e is at offset e. Pack k holds elements
// [k * kSize, (k + 1) * kSize); a block walks packs block * kThreads + t, + blocks * kThreads, ... and the elements
// after the last whole pack go one per thread (the tail). Pack: see above.

// Walks this block's whole packs two at a time, body(k0, k1) (two loads in flight; k1 = -1 for a last single pack),
// then calls tail(e) for this block's elements after the last whole pack, in [packs * kSize, numel).
template <int kSize, typename Body, typename Tail>
__device__ __forceinline__ void for_each_pack(int64_t numel, int64_t block, int64_t blocks, const Body& body,
                                              const Tail& tail) {
  const int64_t packs = numel / kSize, stride = blocks * kThreads;
  int64_t k = block * kThreads + threadIdx.x;
  for (; k + stride < packs; k += 2 * stride) body(k, k + stride);
  if (k < packs) body(k, -1);
  for (int64_t e = packs * kSize + block * kThreads + threadIdx.x; e < numel; e += stride) tail(e);
}

// ---------------------------------------------------------------------------------------------------------------
// The fused u-first round (RoundMode::kFused, launch.h): y = W v and z = W^T y in one pass over W, the CPU kernel's
// matvec_and_gram (csrc/cpu/power_iteration.h). Then u = N(y) and W^T u = z / max(|y|, eps), so v = N(z / max(|y|,
// eps)): one read of W per round where the split round (matvec_block, rmatvec_block) makes two.
//
// Block b owns rows [b * rows_per_block, ...) whole: for each row it computes y_i = W_i . v (a block sum), then adds
// y_i W_i into its own partial z while the row is still in registers. A thread holds kFusedElements<kPacked, acc_t>
// elements of a row (a "segment" of kFusedElements * kThreads columns): 16 for float sums, 8 for double, so that the
// row's elements, the matching v values and the z accumulators fit in registers (64 bytes of sums per thread). A row
// wider than one segment takes two reads of the block's rows (see fused_round_block). The element-wise path (a view
// whose rows are not contiguous 16-byte packs) holds half as many: its addresses take registers too (ptxas spilled at
// 16 floats). The blocks' partial z rows are then added in block order by reduce_columns_block (a fixed order:
// deterministic; no atomics).
template <bool kPacked, typename acc_t>
constexpr int kFusedElements = (kPacked ? 64 : 32) / static_cast<int>(sizeof(acc_t));
// Fewest rows a block owns: the partial z rows (blocks x cols sums, written once and read once) then cost at most
// 2 / kFusedMinRowsPerBlock of a pass over a float W. More rows per block when there are many rows: at most
// kTargetBlocks blocks.
constexpr int64_t kFusedMinRowsPerBlock = 8;

// The fused round's split of the rows: rows per block (at least kFusedMinRowsPerBlock, at most kTargetBlocks
// blocks), and the blocks.
__host__ __device__ inline int64_t fused_rows_per_block(int64_t rows) {
  const int64_t spread = ceil_div(rows, kTargetBlocks);
  return spread > kFusedMinRowsPerBlock ? spread : kFusedMinRowsPerBlock;
}

__host__ __device__ inline int64_t fused_blocks(int64_t rows) {
  return ceil_div(rows, fused_rows_per_block(rows));
}

// The second phase of a fused round (reduce_columns_block): kReduceColumns adjacent columns per block (a warp reads
// 128 contiguous bytes of a float partial row), each added by kReduceGroups threads that take every kReduceGroups-th
// partial row, several loads in flight each, then a fixed tree: deterministic, and kReduceGroups times the loads in
// flight of one thread per column (a 4096-column W's 256 partial rows were 16 blocks of 256 sequential sums).
constexpr int kReduceColumns = 32;
constexpr int kReduceGroups = kThreads / kReduceColumns;

__host__ __device__ inline int64_t fused_reduce_blocks(int64_t cols) {
  return ceil_div(cols, kReduceColumns);
}

// The third phase (fused_normalize_block) on many blocks: u's elements, then v's, one per thread.
__host__ __device__ inline int64_t fused_normalize_blocks(int64_t rows, int64_t cols) {
  return ceil_div(rows, kThreads) + ceil_div(cols, kThreads);
}

// |y|^2 in the fused round: y's squares added in chunks of kYChunk rows (ordered_sum_block), the chunks' sums then
// added one after another in chunk order: by every block of the second phase that needs |y| (reduce_columns_block),
// and from the chunks' sums that its y blocks store (fused_normalize_block): the same operations in the same order,
// the same bits.
// Not in the fused pass itself, whose loops are at the register limit (a running sum made ptxas spill).
constexpr int64_t kYChunk = 8 * kThreads;

__host__ __device__ inline int64_t fused_y_chunks(int64_t rows) {
  return ceil_div(rows, kYChunk);
}

// A layer's fused-round workspace (acc_t offsets): y (rows) | z / max(|y|, eps) (cols) | the fused blocks' partial z
// rows (fused_blocks x cols) | |y|^2's chunk sums (fused_y_chunks) | the reduce blocks' shares of |z / max(|y|, eps)|^2
// (fused_reduce_blocks).
struct FusedWorkspace {
  int64_t z, z_partial, y_squares, z_squares, size;
};

__host__ __device__ inline FusedWorkspace fused_workspace(int64_t rows, int64_t cols) {
  FusedWorkspace ws;
  ws.z = rows;
  ws.z_partial = ws.z + cols;
  ws.y_squares = ws.z_partial + fused_blocks(rows) * cols;
  ws.z_squares = ws.y_squares + fused_y_chunks(rows);
  ws.size = ws.z_squares + fused_reduce_blocks(cols);
  return ws;
}

// Column of this thread's element e (< kFusedElements) in segment `segment`. kPacked: the thread reads 16-byte packs
// k * kThreads + threadIdx.x of the segment (coalesced, one LDG.E.128 each); else single elements at stride kThreads.
template <bool kPacked, typename scalar_t, int kElements>
__device__ __forceinline__ int64_t fused_column(int64_t segment, int e) {
  constexpr int kSize = Pack<scalar_t>::kSize;
  const int64_t first = segment * kElements * kThreads;
  if constexpr (kPacked) {
    return first + (static_cast<int64_t>(e / kSize) * kThreads + threadIdx.x) * kSize + e % kSize;
  } else {
    return first + static_cast<int64_t>(e) * kThreads + threadIdx.x;
  }
}

// This thread's elements of a row's segment, 0 past the row's end, all loads issued before any is used.
// kPacked: the row is contiguous and 16-byte aligned and cols a whole number of packs (rows_packable), so that a
// pack lies wholly inside or outside the row: kFusedElements / kSize 16-byte loads in flight. Else kFusedElements
// single loads, their (o, r) = divmod(column, inner) stepped along without a division per element.
template <typename scalar_t, int kElements>
struct alignas(16) Segment {
  scalar_t val[kElements];
};

template <bool kPacked, int kElements, typename scalar_t>
__device__ __forceinline__ Segment<scalar_t, kElements> load_segment(const scalar_t* row, const View3d& m,
                                                                     int64_t segment) {
  const int64_t cols = m.cols();
  Segment<scalar_t, kElements> w;
  if constexpr (kPacked) {
    using P = Pack<scalar_t>;
    constexpr int kPacks = kElements / P::kSize;
    static_assert(kPacks * P::kSize == kElements, "a thread's segment is a whole number of packs");
    P* packs = reinterpret_cast<P*>(w.val);
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t c = fused_column<true, scalar_t, kElements>(segment, k * P::kSize);
      packs[k] = c < cols ? reinterpret_cast<const P*>(row)[c / P::kSize] : P{};
    }
  } else {
    const int64_t c0 = fused_column<false, scalar_t, kElements>(segment, 0);
    int64_t o = c0 / m.inner, r = c0 - o * m.inner;
    const int64_t step_o = kThreads / m.inner, step_r = kThreads % m.inner;
#pragma unroll
    for (int e = 0; e < kElements; ++e) {
      w.val[e] = c0 + e * kThreads < cols ? row[o * m.s_outer + r * m.s_inner] : scalar_t(0);
      r += step_r;
      o += step_o;
      if (r >= m.inner) {
        r -= m.inner;
        ++o;
      }
    }
  }
  return w;
}

// Segment 0 of v in shared memory, for rows of one segment (registers hold the row's segment and the z sums):
// element e of thread t at [e * kThreads + t], read only by that thread (no bank conflicts, no barrier needed). One
// buffer per sum type, shared by the packed and the element-wise fused_round_block.
template <typename acc_t>
__device__ __forceinline__ acc_t* fused_x_buffer() {
  __shared__ acc_t x0[kFusedElements<true, acc_t> * kThreads];
  return x0;
}

// Block `block` of the fused round over the weight w (through m): x is v (cols,) with stride x_stride; writes
// y[i] = Wm[i, :] . x (whole) for its rows and its partial z row z_partial[block * cols + c] = sum over its rows i of
// y[i] Wm[i, c]. The arguments
// are the launch's __grid_constant__ fields (m a reference to one: a copy would hold a dozen registers through the
// loops, which ptxas then spilled).
template <bool kPacked, typename scalar_t, typename acc_t>
__device__ void fused_round_block(const scalar_t* w, const View3d& m, const scalar_t* x, int64_t x_stride, acc_t* y_out,
                                  acc_t* z_partial, int64_t block) {
  // Fewer elements per thread at a time on the wide rows' path, whose y pass also holds the v values it loads and
  // their addresses: one pack, or half the element-wise count (more made ptxas spill). For float32 its loops are
  // unrolled instead, so that several loads are in flight: 2 segments in the y pass, 4 rows in the z pass (the SASS
  // test); the same unrolling made ptxas spill the float16, bfloat16 and float64 kernels, which keep one at a time.
  constexpr int kElements = kFusedElements<kPacked, acc_t>;
  constexpr int kWide = kPacked ? Pack<scalar_t>::kSize : kElements / 2;
  constexpr int kWideYUnroll = sizeof(scalar_t) == 4 ? 2 : 1, kWideZUnroll = sizeof(scalar_t) == 4 ? 4 : 1;
  __shared__ acc_t scratch[32];
  const int64_t cols = m.cols(), rows_per_block = fused_rows_per_block(m.rows);
  const int64_t segments = ceil_div(cols, int64_t(kElements) * kThreads);
  const int64_t i_begin = block * rows_per_block, i_end = std::min(m.rows, i_begin + rows_per_block);
  acc_t* z_row = z_partial + block * cols;
  const auto x_at = [&](int64_t c) { return c < cols ? static_cast<acc_t>(x[c * x_stride]) : acc_t(0); };
  if (segments == 1) {
    // The row's elements stay in registers from y_i = W_i . x to z += y_i W_i: one read of W.
    acc_t* x0 = fused_x_buffer<acc_t>() + threadIdx.x;
    acc_t z0[kElements];
#pragma unroll
    for (int e = 0; e < kElements; ++e) {
      x0[e * kThreads] = x_at(fused_column<kPacked, scalar_t, kElements>(0, e));
      z0[e] = 0;
    }
    for (int64_t i = i_begin; i < i_end; ++i) {
      const Segment<scalar_t, kElements> seg = load_segment<kPacked, kElements>(w + i * m.s_row, m, 0);
      acc_t y = 0;
#pragma unroll
      for (int e = 0; e < kElements; ++e) y += static_cast<acc_t>(seg.val[e]) * x0[e * kThreads];
      y = block_sum(y, scratch);
      if (threadIdx.x == 0) y_out[i] = y;
#pragma unroll
      for (int e = 0; e < kElements; ++e) z0[e] += y * static_cast<acc_t>(seg.val[e]);
    }
#pragma unroll
    for (int e = 0; e < kElements; ++e) {
      const int64_t c = fused_column<kPacked, scalar_t, kElements>(0, e);
      if (c < cols) z_row[c] = z0[e];
    }
    return;
  }
  // Rows wider than a segment: y for all the block's rows, then z a segment at a time over the same rows, read
  // again from L2, where the block's rows of the first pass still are when the weight (or what the resident blocks
  // read of it between the two passes) fits in L2; a weight far larger may be read up to twice.
  const int64_t wide_segments = ceil_div(cols, int64_t(kWide) * kThreads);
  for (int64_t i = i_begin; i < i_end; ++i) {
    const scalar_t* row = w + i * m.s_row;
    acc_t y = 0;
#pragma unroll kWideYUnroll
    for (int64_t s = 0; s < wide_segments; ++s) {
      const Segment<scalar_t, kWide> seg = load_segment<kPacked, kWide>(row, m, s);
#pragma unroll
      for (int e = 0; e < kWide; ++e)
        y += static_cast<acc_t>(seg.val[e]) * x_at(fused_column<kPacked, scalar_t, kWide>(s, e));
    }
    y = block_sum(y, scratch);
    if (threadIdx.x == 0) y_out[i] = y;
  }
  __syncthreads();  // thread 0's y values are visible to the block
  for (int64_t s = 0; s < wide_segments; ++s) {
    acc_t z[kWide];
#pragma unroll
    for (int e = 0; e < kWide; ++e) z[e] = 0;
#pragma unroll kWideZUnroll
    for (int64_t i = i_begin; i < i_end; ++i) {
      const Segment<scalar_t, kWide> seg = load_segment<kPacked, kWide>(w + i * m.s_row, m, s);
      const acc_t y = y_out[i];
#pragma unroll
      for (int e = 0; e < kWide; ++e) z[e] += y * static_cast<acc_t>(seg.val[e]);
    }
#pragma unroll
    for (int e = 0; e < kWide; ++e) {
      const int64_t c = fused_column<kPacked, scalar_t, kWide>(s, e);
      if (c < cols) z_row[c] = z[e];
    }
  }
}

// The sum of y[i]^2 over chunk `chunk` of kYChunk rows, to every thread (see kYChunk).
template <typename acc_t>
__device__ acc_t y_chunk_square_sum(const acc_t* y, int64_t rows, int64_t chunk) {
  const int64_t begin = chunk * kYChunk, count = rows - begin < kYChunk ? rows - begin : kYChunk;
  return ordered_sum_block(count, [&](int64_t j) { return y[begin + j] * y[begin + j]; });
}

// The fused round's second phase, virtual block `block` of a layer (workspace ws, fused_workspace): the first
// fused_reduce_blocks(cols) add up z, kReduceColumns columns each: z[c] = the fused blocks' partial z rows added in a
// fixed order, divided by max(|y|, eps) (|y| found by each block: kYChunk), so that z holds W^T u with u's unrounded
// value, as the CPU kernel; and its share of |W^T u|^2 in z_squares[block]. The next fused_y_chunks(rows) each store
// one chunk sum of |y|^2 for the third phase.
template <typename acc_t>
__device__ void reduce_columns_block(acc_t* ws_base, const FusedWorkspace& ws, int64_t rows, int64_t cols, acc_t eps,
                                     int64_t block) {
  __shared__ acc_t sums[kThreads];
  __shared__ acc_t scratch[32];
  const int64_t column_blocks = fused_reduce_blocks(cols);
  if (block >= column_blocks) {
    const acc_t sum = y_chunk_square_sum(ws_base, rows, block - column_blocks);
    if (threadIdx.x == 0) ws_base[ws.y_squares + block - column_blocks] = sum;
    return;
  }
  const int64_t blocks = fused_blocks(rows);
  const acc_t* partial = ws_base + ws.z_partial;
  const int lane = threadIdx.x % kReduceColumns, group = threadIdx.x / kReduceColumns;
  const int64_t c = block * kReduceColumns + lane;
  acc_t sum = 0;
  if (c < cols) {
#pragma unroll 4
    for (int64_t b = group; b < blocks; b += kReduceGroups) sum += partial[b * cols + c];
  }
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int half = kReduceGroups / 2; half > 0; half >>= 1) {
    if (group < half) sums[threadIdx.x] += sums[threadIdx.x + half * kReduceColumns];
    __syncthreads();
  }
  acc_t y_squares = 0;
  for (int64_t k = 0; k < fused_y_chunks(rows); ++k) y_squares += y_chunk_square_sum(ws_base, rows, k);
  const acc_t divisor = norm_denominator(sqrt(y_squares), eps);
  acc_t raw = 0;
  if (group == 0 && c < cols) {
    raw = sums[lane] / divisor;
    ws_base[ws.z + c] = raw;
  }
  const acc_t square_sum = block_sum(raw * raw, scratch);
  if (threadIdx.x == 0) ws_base[ws.z_squares + block] = square_sum;
  __syncthreads();  // the next virtual block reuses `sums`
}

// The fused round's third phase, normalize block `block` of a layer: u = N(y) (its u elements) or v = N(W^T u) (its
// v elements; fused_normalize_blocks), each block finding |y| and |W^T u| from the partial squares itself (the same
// bits in every block), so that no single block normalizes a whole layer. The round's degenerate flag: this round's
// norms or flag_in (the previous round's, nullptr in the first round), written by block 0 to flag_out (another int
// than flag_in: blocks read flag_in while block 0 writes); the last round's block 0 writes sigma = |W^T u|^2 /
// max(|W^T u|, eps), and each thread finishes (Finish) the elements it wrote.
template <typename scalar_t, typename acc_t>
__device__ void fused_normalize_block(const acc_t* ws_base, const FusedWorkspace& ws, const Vectors<scalar_t>& vec,
                                      acc_t eps, const int* flag_in, int* flag_out, acc_t* sigma, Finish finish,
                                      int64_t block) {
  const int64_t rows = vec.rows, cols = vec.cols;
  acc_t y_squares = 0;  // the chunks' sums in chunk order, as reduce_columns_block
  for (int64_t k = 0; k < fused_y_chunks(rows); ++k) y_squares += ws_base[ws.y_squares + k];
  const acc_t norm_u = sqrt(y_squares);
  const acc_t norm_v =
      sqrt(ordered_sum_block(fused_reduce_blocks(cols), [&](int64_t b) { return ws_base[ws.z_squares + b]; }));
  const acc_t denom_u = norm_denominator(norm_u, eps), denom_v = norm_denominator(norm_v, eps);
  const bool bad = (flag_in != nullptr && *flag_in != 0) || !usable(norm_u) || !usable(norm_v);
  if (block == 0 && threadIdx.x == 0) {
    *flag_out = bad ? 1 : 0;
    if (sigma != nullptr) *sigma = norm_v * norm_v / denom_v;
  }
  const int64_t u_blocks = ceil_div(rows, kThreads);
  const bool is_u = block < u_blocks;
  const int64_t j = (is_u ? block : block - u_blocks) * kThreads + threadIdx.x;
  if (j >= (is_u ? rows : cols)) return;
  const scalar_t value = static_cast<scalar_t>(is_u ? ws_base[j] / denom_u : ws_base[ws.z + j] / denom_v);
  scalar_t* work = is_u ? vec.u_work : vec.v_work;
  const int64_t stride = is_u ? vec.u_stride : vec.v_stride;
  if (bad && (finish == Finish::kRestore || finish == Finish::kBoth)) {
    work[j] = (is_u ? vec.u_in : vec.v_in)[j * stride];
  } else {
    work[j] = value;
    if (!bad && (finish == Finish::kCommit || finish == Finish::kBoth))
      (is_u ? vec.u_commit : vec.v_commit)[j * stride] = value;
  }
}

// W_sn = W / sigma in op-math (as torch's `weight / sigma`). `packed`: both views contiguous and aligned.
template <typename scalar_t, typename acc_t, typename index_t>
__device__ void divide_block(const scalar_t* w, const View3d& wv, scalar_t* out, const View3d& ov, acc_t sigma,
                             bool packed, index_t numel, index_t block, index_t blocks) {
  if (packed) {
    using P = Pack<scalar_t>;
    const P* wp = reinterpret_cast<const P*>(w);
    P* op = reinterpret_cast<P*>(out);
    const auto divide = [&](const P& a) {
      P b;
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) b.val[j] = static_cast<scalar_t>(static_cast<acc_t>(a.val[j]) / sigma);
      return b;
    };
    for_each_pack<P::kSize>(
        numel, block, blocks,
        [&](int64_t k0, int64_t k1) {
          const P a0 = wp[k0];
          if (k1 < 0) {
            op[k0] = divide(a0);
            return;
          }
          const P a1 = wp[k1];
          op[k0] = divide(a0);
          op[k1] = divide(a1);
        },
        [&](int64_t e) { out[e] = static_cast<scalar_t>(static_cast<acc_t>(w[e]) / sigma); });
    return;
  }
  const index_t rows = static_cast<index_t>(wv.rows), inner = static_cast<index_t>(wv.inner);
  const index_t step = blocks * kThreads;
  for (index_t e = block * kThreads + threadIdx.x; e < numel; e += step) {
    const Index3d<index_t> k = unflatten(e, rows, inner);
    out[ov.offset(k.o, k.i, k.r)] = static_cast<scalar_t>(static_cast<acc_t>(w[wv.offset(k.o, k.i, k.r)]) / sigma);
  }
}

// lambda = <G, W_sn>, stage 1: this block's partial sum, returned to thread 0. `packed`: both views contiguous and
// aligned (the split of the sum then follows the packs: deterministic for given inputs all the same).
template <typename scalar_t, typename acc_t, typename index_t>
__device__ acc_t lambda_partial_block(const scalar_t* g, const View3d& gv, const scalar_t* s, const View3d& sv,
                                      bool packed, index_t numel, index_t block, index_t blocks) {
  __shared__ acc_t scratch[32];
  acc_t sum = 0;
  if (packed) {
    using P = Pack<scalar_t>;
    const P* gp = reinterpret_cast<const P*>(g);
    const P* sp = reinterpret_cast<const P*>(s);
    const auto dot = [](const P& a, const P& b) {
      acc_t d = 0;
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) d += static_cast<acc_t>(a.val[j]) * static_cast<acc_t>(b.val[j]);
      return d;
    };
    for_each_pack<P::kSize>(
        numel, block, blocks,
        [&](int64_t k0, int64_t k1) {
          const P g0 = gp[k0], s0 = sp[k0];
          if (k1 < 0) {
            sum += dot(g0, s0);
            return;
          }
          const P g1 = gp[k1], s1 = sp[k1];
          sum += dot(g0, s0);
          sum += dot(g1, s1);
        },
        [&](int64_t e) { sum += static_cast<acc_t>(g[e]) * static_cast<acc_t>(s[e]); });
    return block_sum(sum, scratch);
  }
  const index_t rows = static_cast<index_t>(gv.rows), inner = static_cast<index_t>(gv.inner);
  const index_t step = blocks * kThreads;
  for (index_t e = block * kThreads + threadIdx.x; e < numel; e += step) {
    const Index3d<index_t> k = unflatten(e, rows, inner);
    sum += static_cast<acc_t>(g[gv.offset(k.o, k.i, k.r)]) * static_cast<acc_t>(s[sv.offset(k.o, k.i, k.r)]);
  }
  return block_sum(sum, scratch);
}

// grad_W = (G - lambda u v^T) / sigma, in the CPU kernel's operation order. `packed`: G's and the output's views
// contiguous and aligned, and a line (inner elements) a whole number of packs, so that a pack lies in one line: one
// division per pack finds its row i and first column.
template <typename scalar_t, typename acc_t, typename index_t>
__device__ void backward_block(const scalar_t* g, const View3d& gv, scalar_t* out, const View3d& ov, const scalar_t* u,
                               int64_t u_stride, const scalar_t* v, int64_t v_stride, acc_t lambda, acc_t sigma,
                               bool packed, index_t numel, index_t block, index_t blocks) {
  const index_t rows = static_cast<index_t>(gv.rows), inner = static_cast<index_t>(gv.inner);
  const auto corrected = [&](scalar_t g_e, acc_t lambda_u, int64_t col) {
    return static_cast<scalar_t>((static_cast<acc_t>(g_e) - lambda_u * static_cast<acc_t>(v[col * v_stride])) / sigma);
  };
  if (packed) {
    using P = Pack<scalar_t>;
    const P* gp = reinterpret_cast<const P*>(g);
    P* op = reinterpret_cast<P*>(out);
    const auto correct = [&](int64_t k, const P& a) {
      const index_t line = static_cast<index_t>(k * P::kSize) / inner;
      const index_t o = line / rows, i = line - o * rows;
      const int64_t col0 =
          static_cast<int64_t>(o) * inner + (static_cast<int64_t>(k * P::kSize) - int64_t(line) * inner);
      const acc_t lambda_u = lambda * static_cast<acc_t>(u[static_cast<int64_t>(i) * u_stride]);
      P b;
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) b.val[j] = corrected(a.val[j], lambda_u, col0 + j);
      op[k] = b;
    };
    // The tail is empty: numel = outer * rows * inner is a whole number of packs when inner is.
    for_each_pack<P::kSize>(
        numel, block, blocks,
        [&](int64_t k0, int64_t k1) {
          const P a0 = gp[k0];
          if (k1 < 0) {
            correct(k0, a0);
            return;
          }
          const P a1 = gp[k1];
          correct(k0, a0);
          correct(k1, a1);
        },
        [](int64_t) {});
    return;
  }
  const index_t step = blocks * kThreads;
  for (index_t e = block * kThreads + threadIdx.x; e < numel; e += step) {
    const Index3d<index_t> k = unflatten(e, rows, inner);
    const acc_t lambda_u = lambda * static_cast<acc_t>(u[static_cast<int64_t>(k.i) * u_stride]);
    const int64_t col = static_cast<int64_t>(k.o) * gv.inner + k.r;
    out[ov.offset(k.o, k.i, k.r)] = corrected(g[gv.offset(k.o, k.i, k.r)], lambda_u, col);
  }
}

// How many blocks lambda's first stage has for `numel` elements (kLambdaItemsPerThread each, at most kMaxLambdaBlocks).
inline int64_t lambda_blocks_for(int64_t numel) {
  return std::max<int64_t>(1, std::min(ceil_div(numel, kThreads * kLambdaItemsPerThread), kMaxLambdaBlocks));
}

// ---------------------------------------------------------------------------------------------------------------
// Host side: launch plans and the op implementations.

struct SplitPlan {
  int lanes;       // see MatvecArgs / RmatvecArgs
  int64_t splits;  // pieces of the reduced dimension (grid.y)
  int64_t chunk;   // length of each piece
  dim3 grid;
};

// Picks the split so that the last piece is never empty, each piece (but the last) a whole number of `align`
// elements; limits are checked here, not in the kernels.
void finish_split(SplitPlan& plan, int64_t reduced, int64_t wanted_splits, int64_t max_splits, int64_t blocks_x,
                  int64_t align = 1) {
  const block_walk::Split split =
      block_walk::split_evenly(reduced, std::max<int64_t>(1, std::min({wanted_splits, max_splits, kMaxGridY})), align);
  plan.chunk = split.chunk;
  plan.splits = split.splits;
  TORCH_CHECK(blocks_x <= std::numeric_limits<int32_t>::max(), "sn_ext: weight too large for the CUDA kernels");
  plan.grid = dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(plan.splits));
}

// The split products' plans. `pack`: the elements of a 16-byte pack where matvec_block and rmatvec_block read W in
// packs (rows_packable), 1 for the scalar loops. Packed, matvec's splits are whole packs, and its threads per row
// about what gives each kSplitUnroll packs; rmatvec's threads own a pack of columns each.
SplitPlan plan_matvec(const View3d& m, int64_t pack) {
  SplitPlan plan;
  const int64_t cols = m.cols();
  const int64_t wanted = ceil_div(kTargetBlocks, m.rows);
  int64_t splits = std::max<int64_t>(1, std::min({wanted, ceil_div(cols, kMinColsPerSplit), kMaxGridY}));
  const int64_t per_thread = pack == 1 ? 1 : pack * matvec_unroll(static_cast<int>(pack));
  plan.lanes = pow2_at_least(ceil_div(ceil_div(cols, splits), per_thread), kThreads);
  finish_split(plan, cols, splits, splits, ceil_div(m.rows, kThreads / plan.lanes), pack);
  return plan;
}

SplitPlan plan_rmatvec(const View3d& m, int64_t pack) {
  SplitPlan plan;
  const int64_t cols = m.cols(), col_packs = cols / pack;
  plan.lanes = pow2_at_least(col_packs, kThreads);
  const int64_t col_blocks = ceil_div(col_packs, plan.lanes);
  const int64_t row_lanes = kThreads / plan.lanes;
  finish_split(plan, m.rows, ceil_div(kTargetBlocks, col_blocks), ceil_div(m.rows, row_lanes * kMinRowsPerThread),
               col_blocks);
  return plan;
}

// The current device's SM count, looked up once per device (a device attribute query: no synchronization).
int64_t multiprocessor_count() {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};
  const c10::DeviceIndex device = c10::cuda::current_device();
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

int elementwise_blocks(int64_t numel) {
  // Enough resident threads to saturate memory; the grid-stride loops cover the rest.
  const int64_t max_blocks = multiprocessor_count() * (2048 / kThreads);
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(numel, kThreads), max_blocks)));
}

// Whether a weight-shaped (outer, rows, inner) view is contiguous (element e at offset e) and 16-byte aligned: what
// the packed paths of the elementwise passes need. `line_packs`: also a line (inner) a whole number of 16-byte packs.
inline bool packable(const at::Tensor& t3, bool line_packs = false) {
  const int64_t outer = t3.size(0), rows = t3.size(1), inner = t3.size(2);
  const bool contiguous = (inner == 1 || t3.stride(2) == 1) && (rows == 1 || t3.stride(1) == inner) &&
                          (outer == 1 || t3.stride(0) == rows * inner);
  const int64_t pack = 16 / t3.element_size();
  return contiguous && reinterpret_cast<uintptr_t>(t3.const_data_ptr()) % 16 == 0 && (!line_packs || inner % pack == 0);
}

// Whether a round (fused, or split: matvec_block, rmatvec_block) can read W's rows in 16-byte packs: column c of row i
// at offset i * s_row + c, rows and the data 16-byte aligned, and cols a whole number of packs.
inline bool rows_packable(const at::Tensor& t3) {
  const int64_t outer = t3.size(0), inner = t3.size(2), pack = 16 / t3.element_size();
  const bool row_contiguous = (inner == 1 || t3.stride(2) == 1) && (outer == 1 || t3.stride(0) == inner);
  return row_contiguous && (outer * inner) % pack == 0 && (t3.size(1) == 1 || t3.stride(1) % pack == 0) &&
         reinterpret_cast<uintptr_t>(t3.const_data_ptr()) % 16 == 0;
}

// Calls f(std::integral_constant<int, kLayers>{}): the launch structs' capacity, 1 for a single layer (a small
// parameter block), kGroupLayers for a group.
template <typename F>
void with_layer_capacity(size_t layers, const F& f) {
  if (layers == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, kGroupLayers>{});
  }
}

template <typename F>
void with_index_type(int64_t numel, const F& f) {
  if (numel <= std::numeric_limits<int32_t>::max()) {
    f(uint32_t{0});
  } else {
    f(uint64_t{0});
  }
}

// Launching (a cooperative launch's grid-wide barriers need every block resident)

// How many blocks of `kernel` fit on the current device at once (a cooperative launch must not ask for more),
// looked up once per kernel and device.
template <auto kernel>
int64_t resident_blocks() {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};
  const c10::DeviceIndex device = c10::cuda::current_device();
  int per_sm = cache[device].load(std::memory_order_relaxed);
  if (per_sm == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    TORCH_CHECK(per_sm > 0, "sn_ext: the CUDA kernel cannot be resident on this device");
    cache[device].store(per_sm, std::memory_order_relaxed);
  }
  return per_sm * multiprocessor_count();
}

// How many blocks a launch of `kernel` gets, for layers of `numel` elements in all whose largest phase has `wanted`
// virtual blocks (see kOneBlockMaxNumel).
template <auto kernel>
int64_t launch_blocks(int64_t numel, int64_t wanted) {
  if (numel <= kOneBlockMaxNumel) return 1;
  return std::max<int64_t>(
      1, std::min({wanted, ceil_div(numel, kThreads * kElementsPerThread), resident_blocks<kernel>()}));
}

// Runs the `steps` phases of kernel(p) on the current stream. One block: one ordinary launch of them all. More: one
// cooperative launch whose blocks wait for each other between phases, or, when the launch mode says so (launch.h)
// or the cooperative launch is refused, one ordinary launch per phase, stream order standing for the barriers.
// The kernels read p.first_step, p.step_count and p.one_block; the parameter block is copied at each launch.
template <auto kernel, typename Params>
void launch_steps(Params& p, int64_t steps, int64_t blocks) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const c10::DeviceIndex device = c10::cuda::current_device();
  const void* function = reinterpret_cast<const void*>(kernel);
  void* args[] = {&p};
  const dim3 grid(static_cast<unsigned>(blocks)), block(kThreads);
  p.one_block = blocks == 1;
  p.first_step = 0;
  p.step_count = steps;
  if (p.one_block) {
    C10_CUDA_CHECK(cudaLaunchKernel(function, grid, block, args, 0, stream));
    return;
  }
  if (launch_mode(device, stream) == LaunchMode::kCooperative) {
    const cudaError_t error = cudaLaunchCooperativeKernel(function, grid, block, args, 0, stream);
    if (error == cudaSuccess) {
      cooperative_succeeded(device);  // proves the device: launch_mode may choose it inside a capture from now on
      return;
    }
    if (!is_cooperative_refusal(error)) C10_CUDA_CHECK(error);
    (void)cudaGetLastError();  // clears the refusal, which the next CUDA error check would report
    cooperative_refused(device, error);
  }
  p.step_count = 1;
  for (p.first_step = 0; p.first_step < steps; ++p.first_step) {
    C10_CUDA_CHECK(cudaLaunchKernel(function, grid, block, args, 0, stream));
  }
}

}  // namespace
}  // namespace sn_ext
