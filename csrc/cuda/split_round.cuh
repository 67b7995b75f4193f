// The split round (SN_EXT_CUDA_ROUND=split, split-scalar; launch.h): the power iteration's products as separate
// passes over W, each followed by a normalization in one block per layer: W v | u = N(.) | W^T u | v = N(.) (u-first),
// or W^T u | v = N(.) | W v | u = N(.) (v-first), then W / sigma. Two reads of W per round where the fused round
// (fused_round.cuh) makes one: the fallback that benchmarks/gpu_check.sh switches to if the fused round fails its
// first GPU check (the two agree to float rounding: their sums run in other orders). Its code is the earlier
// kernels', kept apart from the fused round's so that a fault in one cannot reach the other.
#pragma once

#include "common.cuh"

namespace sn_ext {
namespace {

// Smallest piece of a row (matvec) or column (W^T matvec, per thread) worth a block of its own: below this the
// extra partial sums cost more than the parallelism gains.
constexpr int64_t kMinColsPerSplit = 2048;
constexpr int64_t kMinRowsPerThread = 8;
constexpr int64_t kMaxGridY = 65535;

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
// Phase 2 of a half-step, one block per layer: add the splits, normalize, and (last half-step) finish.

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
    copy_vector(v.u_in, v.u_stride, v.u_work, 1, v.rows);
    copy_vector(v.v_in, v.v_stride, v.v_work, 1, v.cols);
  }
  return norm;
}

// n == 0 (split rounds): sigma = u^T (W v) from the matvec's partial sums; the vectors used (u_used, v_used) are the
// inputs.
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

// ---------------------------------------------------------------------------------------------------------------
// Host side: the split products' launch plans.

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

}  // namespace
}  // namespace sn_ext
