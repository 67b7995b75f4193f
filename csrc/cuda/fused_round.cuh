// The fused round (RoundMode::kFused, the default; launch.h): the forward's power iteration reading W once per round,
// the CPU kernel's matvec_and_gram (csrc/cpu/power_iteration.h), as three kinds of phase over a layer's virtual
// blocks (block_walk::FusedPlan says how many):
//
//   pass    (row_pass_block) a block owns whole rows: y_i = W_i . x for each (kFused, kY), and y_i W_i added to the
//           block's partial z row while the row is in registers (kFused; kZ: u_i W_i, u given); |y|^2's share.
//   sums    (column_sums_block) z = the blocks' partial z rows added in a fixed order, divided by max(|y|, eps) after a
//           kFused pass (z = W^T u with u = y / max(|y|, eps) unrounded, as the CPU kernel); |z|^2's shares.
//   finish  (finish_block) u = N(y), v = N(z), sigma, the degenerate check, the vectors committed or restored, and
//           W / sigma, each block its own rows (walking back over them: what the pass read last is read first).
//
// A pass after the first reads v = N(z) as it goes: x_c = z_c / max(|z|, eps) rounded to the weight's dtype, the
// vector torch's next W v would use. Every block finds the norms it needs from the partial squares itself, in one
// fixed order (the same bits in every block), once per layer and phase: no phase waits for a one-block total. The
// schedules (fused_step):
//
//   u-first, n rounds:  pass(kFused, x = v) | sums | [pass(kFused, x = N(z)) | sums] x (n - 1) | finish
//   v-first, n rounds:  pass(kZ, u) | sums | [pass(kFused, x = N(z)) | sums] x (n - 1) | pass(kY, x = N(z)) | finish
//   n = 0:              pass(kY, x = v; u . y's shares in place of |y|^2's) | finish (sigma = u^T W v)
//
// A dense layer (FusedPlan::dense: one block owns all its rows) runs its whole schedule in one virtual block of the
// launch's first phase, its steps separated by __syncthreads, and has no virtual block in the others: its pass
// finishes z itself (no sums step). Every split depends on the shape alone, every addition order is fixed, and no
// floating-point atomics are used: the same inputs give the same bits, alone or in a group, in any launch mode.
#pragma once

#include "common.cuh"
#include "elementwise.cuh"

namespace sn_ext {
namespace {

using block_walk::element_column;
using block_walk::fused_step;
using block_walk::fused_steps;
using block_walk::fused_workspace;
using block_walk::FusedPhase;
using block_walk::FusedPlan;
using block_walk::FusedStep;
using block_walk::FusedWorkspace;
using block_walk::Pass;
using block_walk::unit_column;
using block_walk::z_square_count;

// A thread's share of a row per step: kElements op-math sums' worth (block_walk::kFusedBytes, element-wise
// kFusedElementwiseBytes), kUnits adjacent loads of kUnit elements (16-byte packs, or single elements).
template <bool kPacked, typename scalar_t, typename acc_t>
struct RowUnits {
  static constexpr int kUnit = kPacked ? 16 / static_cast<int>(sizeof(scalar_t)) : 1;
  static constexpr int kElements =
      (kPacked ? block_walk::kFusedBytes : block_walk::kFusedElementwiseBytes) / static_cast<int>(sizeof(acc_t));
  static constexpr int kUnits = kElements / kUnit;
  static_assert(kUnits * kUnit == kElements, "a thread's share of a row is a whole number of loads");
};

template <typename scalar_t, int kElements>
struct alignas(16) RowShare {
  scalar_t val[kElements];
};

// Where column c of a row lies relative to the row's first element: Wm[i, c] = W3[c / inner][i][c % inner]. 32-bit
// division where the columns allow (several times cheaper); the offset itself is 64-bit.
__device__ __forceinline__ int64_t column_offset(const View3d& m, int64_t c) {
  if (m.outer == 1) return c * m.s_inner;
  if (m.cols() <= static_cast<int64_t>(UINT32_MAX)) {
    const uint32_t c32 = static_cast<uint32_t>(c), inner = static_cast<uint32_t>(m.inner), o = c32 / inner;
    return static_cast<int64_t>(o) * m.s_outer + static_cast<int64_t>(c32 - o * inner) * m.s_inner;
  }
  const int64_t o = c / m.inner;
  return o * m.s_outer + (c - o * m.inner) * m.s_inner;
}

// Where this thread's units of a row lie in segment s, relative to the row's first element: packed, the offset of its
// run (-1 past the row's end); element-wise, of its first element (its others are found per load).
template <bool kPacked, int kUnits, int kUnit>
__device__ __forceinline__ int64_t run_offset(const View3d& m, int64_t s, int threads, int tx) {
  const int64_t c0 = unit_column<kUnits, kUnit>(s, 0, threads, tx);
  return c0 < m.cols() ? column_offset(m, c0) : -1;
}

// This thread's units of a row (zeros for row == nullptr, a row past the block's end, and for units past the row's
// end), every load issued before any is used, `run` = run_offset(s, ...). Packed: the thread's units are one
// contiguous, aligned run (fused_packable), loaded as 16-byte packs at constant offsets from one address.
template <bool kPacked, int kUnits, int kUnit, typename scalar_t>
__device__ __forceinline__ RowShare<scalar_t, kUnits * kUnit> load_row(const scalar_t* row, int64_t run,
                                                                       const View3d& m, int64_t s, int threads,
                                                                       int tx) {
  RowShare<scalar_t, kUnits * kUnit> w;
  const int64_t cols = m.cols(), c0 = unit_column<kUnits, kUnit>(s, 0, threads, tx);
  if constexpr (kPacked) {
    using P = Pack<scalar_t>;
    static_assert(P::kSize == kUnit, "packed units are 16-byte packs");
    P* packs = reinterpret_cast<P*>(w.val);
    const P* at = row != nullptr && run >= 0 ? reinterpret_cast<const P*>(row + run) : nullptr;
#pragma unroll
    for (int k = 0; k < kUnits; ++k) packs[k] = at != nullptr && c0 + k * kUnit < cols ? at[k] : P{};
  } else {
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      const bool ok = row != nullptr && c0 + k < cols;
      w.val[k] = ok ? row[k == 0 ? run : column_offset(m, c0 + k)] : scalar_t(0);
    }
  }
  return w;
}

// a and b summed over the `threads` lanes of each row group (a power of 2), to every thread of the group: butterfly
// shuffles within a warp (both lanes of a pair add the same two values, so every lane gets the same bits), then, for
// rows wider than a warp, the warps' sums through shared memory in warp order: one __syncthreads, in one of two
// buffers by `parity`, so that the next call writes the other while slow threads may still read this one.
template <typename acc_t>
__device__ __forceinline__ void row_group_sum2(acc_t& a, acc_t& b, int threads, int parity) {
  __shared__ acc_t scratch[2][2][kThreads / 32];
  const int width = threads < 32 ? threads : 32;
  for (int mask = 1; mask < width; mask <<= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, mask);
    b += __shfl_xor_sync(0xffffffffu, b, mask);
  }
  if (threads <= 32) return;
  const int warp = thread_x() / 32, per_row = threads / 32, first = warp / per_row * per_row;
  if (thread_x() % 32 == 0) {
    scratch[parity][0][warp] = a;
    scratch[parity][1][warp] = b;
  }
  __syncthreads();
  a = scratch[parity][0][first];
  b = scratch[parity][1][first];
  for (int k = 1; k < per_row; ++k) {
    a += scratch[parity][0][first + k];
    b += scratch[parity][1][first + k];
  }
}

// Slots [e * kThreads + t], e < count, held by every thread t (thread t's value for (e, t % threads)), added over the
// kThreads / threads threads that share each (e, t % threads), in a fixed tree: within a warp by shuffles (groups
// narrower than a warp), then over the warps or groups through shared memory, one __syncthreads a level. The totals
// land at [e * kThreads + x], x < threads. Every thread must call it; it ends with a __syncthreads.
template <typename acc_t>
__device__ void add_thread_groups(acc_t* slots, int count, int threads) {
  int holders = kThreads / threads,
      spacing = threads;  // who holds a sum of (e, x): slot e * kThreads + h * spacing + x
  if (threads < 32) {
    for (int e = 0; e < count; ++e) {
      acc_t value = slots[e * kThreads + thread_x()];
      for (int offset = 16; offset >= threads; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
      if (thread_x() % 32 < threads) slots[e * kThreads + thread_x()] = value;
    }
    holders = kThreads / 32;
    spacing = 32;
  }
  for (int half = holders / 2; half > 0; half >>= 1) {
    __syncthreads();
    for (int item = thread_x(); item < half * count * threads; item += kThreads) {
      const int x = item % threads, e = item / threads % count, h = item / threads / count;
      slots[e * kThreads + h * spacing + x] += slots[e * kThreads + (h + half) * spacing + x];
    }
  }
  __syncthreads();
}

// Shared memory of a pass: x for this thread's columns, and its z sums then |y|^2's share (slot e of thread t at
// [e * kThreads + t], touched only by t until the rows' sums are added). One buffer per op-math type, sized for the
// largest share of a row (the packed one), whatever pass uses it: separate ones would pass the 48 KB of static shared
// memory a block may have.
template <typename acc_t, int kElements>
struct PassShared {
  acc_t* x;
  acc_t* z;
};

template <typename acc_t>
__device__ __forceinline__ acc_t* pass_buffer() {
  constexpr int kLargest = block_walk::kFusedBytes / static_cast<int>(sizeof(acc_t));
  __shared__ acc_t buffer[(2 * kLargest + 1) * kThreads];
  return buffer;
}

template <typename acc_t, int kElements>
__device__ __forceinline__ PassShared<acc_t, kElements> pass_shared() {
  static_assert(kElements <= block_walk::kFusedBytes / static_cast<int>(sizeof(acc_t)), "a share fits the buffer");
  acc_t* const buffer = pass_buffer<acc_t>();
  return {buffer, buffer + kElements * kThreads};
}

// What a pass reads besides W: x, the caller's vector (x_in, stride x_stride; x_order: its element of each of W's
// columns, where the layer reads them in memory order) or z / x_divisor rounded to the weight's dtype (x_in ==
// nullptr; z in W's column order); and u (stride u_stride): kZ's row weights, or the dot's (n = 0); else nullptr.
template <typename scalar_t, typename acc_t>
struct PassInput {
  const scalar_t* x_in;
  int64_t x_stride;
  block_walk::ColumnOrder x_order;
  const acc_t* z;
  acc_t x_divisor;
  const scalar_t* u;
  int64_t u_stride;
  __device__ acc_t x(int64_t c) const {
    return x_in != nullptr ? static_cast<acc_t>(x_in[x_order.logical(c) * x_stride])
                           : static_cast<acc_t>(static_cast<scalar_t>(z[c] / x_divisor));
  }
  __device__ acc_t u_at(int64_t i) const { return static_cast<acc_t>(u[i * u_stride]); }
};

// The end of a pass over a block's rows: its |y|^2 share (u . y's with `dot`) at y_squares[block]; a dense layer's
// block also adds up |z|^2 (its threads' shares of the z it wrote) into z_squares[0]. Ends with a __syncthreads (the
// next virtual block reuses the shared memory; a dense layer's next step reads these).
template <typename acc_t, typename Layer>
__device__ void finish_pass_shares(const Layer& L, bool has_z, acc_t y_squares, acc_t z_squares, int64_t block) {
  const FusedWorkspace wsp = fused_workspace(L.wv.rows, L.wv.cols(), L.fused);
  const bool dense = L.fused.dense();
  if (has_z && dense) z_squares = block_sum(z_squares, ordered_sum_scratch<acc_t>());
  if (thread_x() == 0) {
    L.partial[wsp.y_squares + block] = y_squares;
    if (has_z && dense) L.partial[wsp.z_squares] = z_squares;
  }
  __syncthreads();
}

// Rows that fit one segment: each row's share stays in registers from y_i = W_i . x to z += y_i W_i (one read of W),
// two steps of rows at a time (both loads in flight, one combined sum).
template <bool kPacked, typename scalar_t, typename acc_t, typename Layer>
__device__ void narrow_pass_block(const Layer& L, Pass pass, const PassInput<scalar_t, acc_t>& in, bool dot, acc_t eps,
                                  int64_t block) {
  using Units = RowUnits<kPacked, scalar_t, acc_t>;
  constexpr int kE = Units::kElements, kK = Units::kUnits, kP = Units::kUnit;
  const bool has_z = pass != Pass::kY, has_y = pass != Pass::kZ;
  const View3d& m = L.wv;
  const FusedPlan& plan = L.fused;
  const int64_t cols = m.cols();
  acc_t* const ws = L.partial;
  const PassShared<acc_t, kE> sh = pass_shared<acc_t, kE>();
  acc_t* const xs = sh.x + thread_x();  // this thread's slots
  acc_t* const zs = sh.z + thread_x();
  const int threads = plan.threads, tx = thread_x() % threads, rows_per_step = kThreads / threads;
  const int64_t first_row = block * plan.rows_per_block, i_end = std::min(m.rows, first_row + plan.rows_per_block);
  const int64_t steps = ceil_div(i_end - first_row, rows_per_step);
  const int64_t run = run_offset<kPacked, kK, kP>(m, 0, threads, tx);
#pragma unroll
  for (int e = 0; e < kE; ++e) {
    const int64_t c = element_column<kK, kP>(0, e, threads, tx);
    if (has_y) xs[e * kThreads] = c < cols ? in.x(c) : acc_t(0);
    if (has_z) zs[e * kThreads] = 0;
  }
  acc_t y_squares = 0;
  const bool weights = pass == Pass::kZ || (pass == Pass::kY && dot);  // u loaded per row
  for (int64_t st = 0; st < steps; st += 2) {
    const int64_t i0 = first_row + st * rows_per_step + thread_x() / threads, i1 = i0 + rows_per_step;
    const bool ok0 = i0 < i_end, ok1 = i1 < i_end;
    const RowShare<scalar_t, kE> a =
        load_row<kPacked, kK, kP>(ok0 ? L.w + i0 * m.s_row : nullptr, run, m, 0, threads, tx);
    const RowShare<scalar_t, kE> b =
        load_row<kPacked, kK, kP>(ok1 ? L.w + i1 * m.s_row : nullptr, run, m, 0, threads, tx);
    const acc_t u0 = weights && ok0 ? in.u_at(i0) : acc_t(0), u1 = weights && ok1 ? in.u_at(i1) : acc_t(0);
    acc_t y0 = u0, y1 = u1;
    if (has_y) {  // uniform over the block: row_group_sum2's __syncthreads is reached by all or none
      y0 = 0;
      y1 = 0;
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        const acc_t x = xs[e * kThreads];
        y0 += static_cast<acc_t>(a.val[e]) * x;
        y1 += static_cast<acc_t>(b.val[e]) * x;
      }
      row_group_sum2(y0, y1, threads, static_cast<int>(st / 2) & 1);
      y0 = ok0 ? y0 : acc_t(0);
      y1 = ok1 ? y1 : acc_t(0);
      if (tx == 0 && ok0) ws[i0] = y0;
      if (tx == 0 && ok1) ws[i1] = y1;
      y_squares += y0 * (weights ? u0 : y0);
      y_squares += y1 * (weights ? u1 : y1);
    }
    if (has_z) {
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        acc_t z = zs[e * kThreads];
        z += y0 * static_cast<acc_t>(a.val[e]);
        z += y1 * static_cast<acc_t>(b.val[e]);
        zs[e * kThreads] = z;
      }
    }
  }
  // The row groups' z sums and |y|^2 shares added (the lanes of a row group agree on y, so its first lane's share
  // stands for the group): |y|^2 in slot kE, z in slots 0..kE-1.
  zs[kE * kThreads] = tx == 0 ? y_squares : acc_t(0);
  acc_t* const first_slot = sh.z + (has_z ? 0 : kE * kThreads);
  if (threads < kThreads) {
    add_thread_groups(first_slot, has_z ? kE + 1 : 1, threads);
  } else {
    __syncthreads();
  }
  y_squares = sh.z[kE * kThreads];
  acc_t divisor = 1;
  if (pass == Pass::kFused && plan.dense()) divisor = norm_denominator(sqrt(y_squares), eps);
  acc_t z_squares = 0;
  if (has_z) {
    for (int slot = thread_x(); slot < kE * threads; slot += kThreads) {
      const int e = slot / threads, x = slot % threads;
      const int64_t c = element_column<kK, kP>(0, e, threads, x);
      if (c >= cols) continue;
      const acc_t z = sh.z[e * kThreads + x];
      if (plan.dense()) {
        const acc_t zd = z / divisor;
        ws[m.rows + c] = zd;
        z_squares += zd * zd;
      } else {
        ws[fused_workspace(m.rows, cols, plan).partial + block * cols + c] = z;
      }
    }
  }
  finish_pass_shares(L, has_z, y_squares, z_squares, block);
}

// Rows wider than a segment (threads == kThreads, one row per step): y for the block's rows two at a time (every
// segment's loads of both rows in flight together, then one block-wide sum of both), then z a segment at a time over
// the same rows, read again from L1/L2 walking back (the last read first).
template <bool kPacked, typename scalar_t, typename acc_t, typename Layer>
__device__ void wide_pass_block(const Layer& L, Pass pass, const PassInput<scalar_t, acc_t>& in, bool dot, acc_t eps,
                                int64_t block) {
  using Units = RowUnits<kPacked, scalar_t, acc_t>;
  constexpr int kE = Units::kElements, kK = Units::kUnits, kP = Units::kUnit;
  const bool has_z = pass != Pass::kY, has_y = pass != Pass::kZ;
  const View3d& m = L.wv;
  const FusedPlan& plan = L.fused;
  const int64_t cols = m.cols();
  acc_t* const ws = L.partial;
  const int tx = thread_x();
  const int64_t first_row = block * plan.rows_per_block, i_end = std::min(m.rows, first_row + plan.rows_per_block);
  acc_t y_squares = 0;
  if (has_y) {
    for (int64_t i0 = first_row; i0 < i_end; i0 += 2) {
      const int64_t i1 = i0 + 1;
      const bool ok1 = i1 < i_end;
      const acc_t u0 = dot ? in.u_at(i0) : acc_t(0), u1 = dot && ok1 ? in.u_at(i1) : acc_t(0);
      acc_t y0 = 0, y1 = 0;
      for (int64_t s = 0; s < plan.segments; ++s) {
        const int64_t run = run_offset<kPacked, kK, kP>(m, s, kThreads, tx);
        const RowShare<scalar_t, kE> a = load_row<kPacked, kK, kP>(L.w + i0 * m.s_row, run, m, s, kThreads, tx);
        const RowShare<scalar_t, kE> b =
            load_row<kPacked, kK, kP>(ok1 ? L.w + i1 * m.s_row : nullptr, run, m, s, kThreads, tx);
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          const int64_t c = element_column<kK, kP>(s, e, kThreads, tx);
          const acc_t x = c < cols ? in.x(c) : acc_t(0);
          y0 += static_cast<acc_t>(a.val[e]) * x;
          y1 += static_cast<acc_t>(b.val[e]) * x;
        }
      }
      row_group_sum2(y0, y1, kThreads, static_cast<int>((i0 - first_row) / 2) & 1);
      y1 = ok1 ? y1 : acc_t(0);
      if (tx == 0) ws[i0] = y0;
      if (tx == 0 && ok1) ws[i1] = y1;
      y_squares += y0 * (dot ? u0 : y0);
      y_squares += y1 * (dot ? u1 : y1);
    }
  }
  acc_t z_squares = 0;
  if (has_z) {
    __syncthreads();  // thread 0's y values are visible to the block
    const acc_t divisor = pass == Pass::kFused && plan.dense() ? norm_denominator(sqrt(y_squares), eps) : acc_t(1);
    const int64_t partial = fused_workspace(m.rows, cols, plan).partial + block * cols;
    acc_t* const zs = pass_shared<acc_t, kE>().z + tx;
    const auto weight = [&](int64_t i) { return pass == Pass::kZ ? in.u_at(i) : ws[i]; };
    for (int64_t s = plan.segments - 1; s >= 0; --s) {
      const int64_t run = run_offset<kPacked, kK, kP>(m, s, kThreads, tx);
#pragma unroll
      for (int e = 0; e < kE; ++e) zs[e * kThreads] = 0;
      for (int64_t i1 = i_end - 1; i1 >= first_row; i1 -= 2) {
        const int64_t i0 = i1 - 1;
        const bool ok0 = i0 >= first_row;
        const RowShare<scalar_t, kE> a = load_row<kPacked, kK, kP>(L.w + i1 * m.s_row, run, m, s, kThreads, tx);
        const RowShare<scalar_t, kE> b =
            load_row<kPacked, kK, kP>(ok0 ? L.w + i0 * m.s_row : nullptr, run, m, s, kThreads, tx);
        const acc_t y1 = weight(i1), y0 = ok0 ? weight(i0) : acc_t(0);
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          acc_t z = zs[e * kThreads];
          z += y1 * static_cast<acc_t>(a.val[e]);
          z += y0 * static_cast<acc_t>(b.val[e]);
          zs[e * kThreads] = z;
        }
      }
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        const int64_t c = element_column<kK, kP>(s, e, kThreads, tx);
        if (c >= cols) continue;
        if (plan.dense()) {
          const acc_t z = zs[e * kThreads] / divisor;
          ws[m.rows + c] = z;
          z_squares += z * z;
        } else {
          ws[partial + c] = zs[e * kThreads];
        }
      }
    }
  }
  finish_pass_shares(L, has_z, y_squares, z_squares, block);
}

// Block `block` of a pass over layer L's rows [block * rows_per_block, ...): y_i for its rows (kFused, kY), and its
// partial z row (kFused, kZ) and |y|^2's share (u . y's with `dot`); a dense layer's one block finishes z itself:
// z = sums / max(|y|, eps) (kFused; kZ: the sums), and |z|^2. Every thread must call it.
template <bool kPacked, typename scalar_t, typename acc_t, typename Layer>
__device__ void row_pass_block(const Layer& L, Pass pass, const PassInput<scalar_t, acc_t>& in, bool dot, acc_t eps,
                               int64_t block) {
  if (L.fused.segments == 1) {
    narrow_pass_block<kPacked>(L, pass, in, dot, eps, block);
  } else {
    wide_pass_block<kPacked>(L, pass, in, dot, eps, block);
  }
}

// Virtual block j of a layer's column sums (a layer of several blocks of rows): columns [j * C, (j + 1) * C), C =
// reduce_columns(); thread (g, x) adds partial rows g, g + reduce_groups, ... of column j * C + x (4 loads in flight),
// then the groups' sums are added in a fixed tree; z = total / divisor, and the block's share of |z|^2.
template <typename acc_t, typename Layer>
__device__ void column_sums_block(const Layer& L, acc_t divisor, int64_t j) {
  acc_t* const slots = pass_buffer<acc_t>();
  const FusedPlan& p = L.fused;
  const int64_t cols = L.wv.cols();
  const FusedWorkspace wsp = fused_workspace(L.wv.rows, cols, p);
  acc_t* const ws = L.partial;
  const int columns = kThreads / p.reduce_groups, x = thread_x() % columns, g = thread_x() / columns;
  const int64_t c = j * columns + x;
  acc_t sum = 0;
  if (c < cols) {
    const acc_t* column = ws + wsp.partial + c;
#pragma unroll 4
    for (int64_t b = g; b < p.blocks; b += p.reduce_groups) sum += column[b * cols];
  }
  slots[thread_x()] = sum;
  add_thread_groups(slots, 1, columns);
  acc_t z = 0;
  if (thread_x() < columns && c < cols) {
    z = slots[thread_x()] / divisor;
    ws[wsp.z + c] = z;
  }
  const acc_t share = block_sum(z * z, ordered_sum_scratch<acc_t>());
  if (thread_x() == 0) ws[wsp.z_squares + j] = share;
}

// |y|^2's and |z|^2's shares of a layer added in order (with_y, with_z: which; one block-wide sum for both), to
// every thread: every block that needs a norm finds it so, with the same bits.
template <typename acc_t, typename Layer>
__device__ void layer_square_sums(const Layer& L, bool with_y, bool with_z, acc_t& y, acc_t& z) {
  const FusedWorkspace wsp = fused_workspace(L.wv.rows, L.wv.cols(), L.fused);
  const acc_t* ws = L.partial;
  ordered_sum2_block(
      with_y ? L.fused.blocks : 0, [&](int64_t j) { return ws[wsp.y_squares + j]; },
      with_z ? z_square_count(L.fused) : 0, [&](int64_t j) { return ws[wsp.z_squares + j]; }, y, z);
}

// Elements [begin, end) of a vector the forward returns (work; the caller's `in` and, when committing, `commit`, the
// same memory, at stride `stride`): value(j) (from the workspace, in W's column order) at order.logical(j), or the
// input after a degenerate round, also committed. kVectorBatch elements per thread at a time (block_walk.h), all loaded
// before any is stored (the loads' round trips overlap; one block finishes a 1 x 8192 weight's v in 4).
template <typename scalar_t, typename Value>
__device__ __forceinline__ void finish_elements(scalar_t* work, const scalar_t* in, scalar_t* commit, int64_t stride,
                                                block_walk::ColumnOrder order, int64_t begin, int64_t end, bool restore,
                                                const Value& value) {
  for (int64_t base = begin + thread_x(); base < end; base += int64_t(block_walk::kVectorBatch) * kThreads) {
    scalar_t batch[block_walk::kVectorBatch];
#pragma unroll
    for (int q = 0; q < block_walk::kVectorBatch; ++q) {
      const int64_t j = base + q * kThreads;
      batch[q] = j < end ? (restore ? in[order.logical(j) * stride] : value(j)) : scalar_t(0);
    }
#pragma unroll
    for (int q = 0; q < block_walk::kVectorBatch; ++q) {
      const int64_t j = base + q * kThreads;
      if (j >= end) continue;
      const int64_t at = order.logical(j);
      work[at] = batch[q];
      if (commit != nullptr && !restore) commit[at * stride] = batch[q];
    }
  }
}

// What the finish of a layer writes, found by each block: u = y / u_divisor, v = z / v_divisor (normalize; else n = 0:
// the input vectors are the results), sigma, and whether some round was degenerate.
template <typename acc_t>
struct Finishing {
  acc_t u_divisor, v_divisor, sigma;
  bool normalize, bad;
};

// Virtual block b of a layer's finish (b < blocks): u for its rows, v for its share of the columns, sigma (block 0),
// and W / sigma (a scaled form's W g / max(sigma, f)) for its rows (walked back: the pass read them last), where the
// layer has an output.
template <typename scalar_t, typename acc_t, typename index_t, typename Layer>
__device__ void finish_block(const Layer& L, const Finishing<acc_t>& f, int64_t b) {
  const FusedPlan& p = L.fused;
  const int64_t rows = L.wv.rows, cols = L.wv.cols();
  const acc_t* ws = L.partial;
  const Vectors<scalar_t>& vec = L.vec;
  if (b == 0 && thread_x() == 0) *L.sigma = f.sigma;
  const bool restore = f.bad && (L.finish == Finish::kRestore || L.finish == Finish::kBoth);
  const bool commit = !f.bad && (L.finish == Finish::kCommit || L.finish == Finish::kBoth);
  scalar_t* const u_commit = commit ? vec.u_in : nullptr;
  scalar_t* const v_commit = commit ? vec.v_in : nullptr;
  const int64_t r0 = b * p.rows_per_block, r1 = std::min(rows, r0 + p.rows_per_block);
  const int64_t share = ceil_div(cols, p.blocks), c0 = b * share, c1 = std::min(cols, c0 + share);
  if (f.normalize) {
    finish_elements(vec.u_work, vec.u_in, u_commit, vec.u_stride, block_walk::ColumnOrder{}, r0, r1, restore,
                    [&](int64_t i) { return static_cast<scalar_t>(ws[i] / f.u_divisor); });
    finish_elements(vec.v_work, vec.v_in, v_commit, vec.v_stride, L.v_order, c0, c1, restore,
                    [&](int64_t c) { return static_cast<scalar_t>(ws[rows + c] / f.v_divisor); });
  } else if (L.finish != Finish::kCommit) {  // n = 0: the inputs are the vectors used
    for (int64_t i = r0 + thread_x(); i < r1; i += kThreads) vec.u_work[i] = vec.u_in[i * vec.u_stride];
    for (int64_t c = c0 + thread_x(); c < c1; c += kThreads) vec.v_work[c] = vec.v_in[c * vec.v_stride];
  }
  if (L.out == nullptr) return;
  const int64_t unit = L.divide_packed ? 16 / static_cast<int64_t>(sizeof(scalar_t)) : 1;
  const block_walk::Range piece = block_walk::piece(L.numel, ceil_div(p.rows_per_block * cols, unit) * unit, b);
  divide_range<true, scalar_t, acc_t, index_t>(L.w, L.wv, L.out, L.ov, L.scaled.output_divisor(f.sigma),
                                               L.divide_packed, piece.begin, piece.end);
}

}  // namespace
}  // namespace sn_ext
