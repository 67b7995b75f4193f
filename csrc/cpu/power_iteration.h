// Power iteration on the CPU, shared by power_iteration_ (power_iteration_cpu.cpp) and spectral_normalize
// (spectral_normalize_cpu.cpp): the matrix-vector products and power_iterate(), which runs the rounds.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "common.h"

namespace sn_ext {
namespace {

// y[q] = (row i + q of Wm) . x for q < NR: the rows' segments of constant o, dotted NR rows at a time.
template <int64_t NR, typename scalar_t>
void dot_matrix_rows(const Matrix3d<const scalar_t>& W, int64_t i, const LaneVector<scalar_t>& x, acc_t* y) {
  std::fill(y, y + NR, acc_t(0));
  for (int64_t o = 0; o < W.outer; ++o) {
    acc_t part[NR];
    dot_rows<NR>(W.line(o, i), W.s_row, W.s_inner, x.data() + o * W.inner, W.inner, part);
    for (int64_t q = 0; q < NR; ++q) y[q] += part[q];
  }
}

// y = Wm x, parallel over blocks of kRowBlock rows.
template <typename scalar_t>
void matvec(const Matrix3d<const scalar_t>& W, const Vector& x, Vector& y) {
  const LaneVector<scalar_t> lanes_x = to_lanes<scalar_t>(x);
  const int64_t blocks = (W.rows + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, grain_for(kRowBlock * W.cols()), [&](int64_t begin, int64_t end) {
    for_each_row_block(begin * kRowBlock, std::min(W.rows, end * kRowBlock),
                       [&](auto nr, int64_t i) { dot_matrix_rows<decltype(nr)::value>(W, i, lanes_x, y.data() + i); });
  });
}

// z = Wm^T y, parallel over column chunks (each task owns its slice of z: no reduction across tasks). Each element
// of z adds the rows in order, kRowBlock rows per read and write of z, in lane_t.
template <typename scalar_t>
void rmatvec(const Matrix3d<const scalar_t>& W, const Vector& y, Vector& z) {
  const LaneVector<scalar_t> lanes_y = to_lanes<scalar_t>(y);
  const int64_t chunk_grain = std::max<int64_t>(64, grain_for(W.rows));
  at::parallel_for(0, W.cols(), chunk_grain, [&](int64_t begin, int64_t end) {
    LaneVector<scalar_t> chunk(end - begin);  // z[begin, end), zeroed
    // Walk [begin, end) as segments of constant o: columns o * inner + [r0, r1).
    for (int64_t c = begin; c < end;) {
      const int64_t o = c / W.inner, r0 = c % W.inner, r1 = std::min(W.inner, r0 + (end - c));
      lane_t<scalar_t>* zc = chunk.data() + (c - begin);  // zc[k] is column c + k
      for_each_row_block(0, W.rows, [&](auto nr, int64_t i) {
        add_rows<decltype(nr)::value>(W.line(o, i) + r0 * W.s_inner, W.s_row, W.s_inner, lanes_y.data() + i, zc, 0,
                                      r1 - r0);
      });
      c += r1 - r0;
    }
    std::copy(chunk.begin(), chunk.end(), z.begin() + begin);
  });
}

// y = Wm x and z = Wm^T y in ONE pass over W: a row block is dotted with x, then added into z scaled by y while it
// is still in L1. A u-first round needs W^T u = W^T y / max(|y|, eps), so this halves its memory traffic.
// Rows are split into partitions that depend only on the shape, each with its own partial z, summed in partition
// order: the result does not depend on the thread count. A partition holds at least kMinPartitionRows rows: its
// partial z is zeroed, read and written once per row block and read once more at the end, so with fewer rows that
// traffic outgrows the partition's share of W (8 rows of a 512x512x3x3 float32 weight: 147 KB of W against
// ~220 KB of partial-sum traffic). Each partial is zeroed by the task that fills it (in its cache, not by one thread up
// front), and the partials are added over column chunks in parallel.
template <typename scalar_t>
void matvec_and_gram(const Matrix3d<const scalar_t>& W, const Vector& x, Vector& y, Vector& z) {
  const int64_t cols = W.cols();
  constexpr int64_t kMaxPartialElements = int64_t(1) << 22;  // 32 MB of double partial sums at most (float: 16)
  constexpr int64_t kMinPartitionRows = 8 * kRowBlock;
  constexpr int64_t kMinPartitions = 4;  // a weight of few, long rows still spreads over 4 threads
  const int64_t partitions =
      std::max<int64_t>(1, std::min({std::max(W.rows / kMinPartitionRows, std::min(W.rows, kMinPartitions)),
                                     (W.rows * cols) / kGrainElements, int64_t(64), kMaxPartialElements / cols}));
  const int64_t rows_per_partition = (W.rows + partitions - 1) / partitions;
  const LaneVector<scalar_t> lanes_x = to_lanes<scalar_t>(x);
  const std::unique_ptr<lane_t<scalar_t>[]> partial(new lane_t<scalar_t>[partitions * cols]);  // zeroed by its tasks
  at::parallel_for(0, partitions, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      lane_t<scalar_t>* zp = partial.get() + p * cols;
      std::fill(zp, zp + cols, lane_t<scalar_t>(0));
      const int64_t first = p * rows_per_partition, last = std::min(W.rows, first + rows_per_partition);
      for_each_row_block(first, last, [&](auto nr, int64_t i) {
        constexpr int64_t NR = decltype(nr)::value;
        dot_matrix_rows<NR>(W, i, lanes_x, y.data() + i);
        lane_t<scalar_t> block_y[NR];
        std::copy(y.data() + i, y.data() + i + NR, block_y);
        for (int64_t o = 0; o < W.outer; ++o)
          add_rows<NR>(W.line(o, i), W.s_row, W.s_inner, block_y, zp + o * W.inner, 0, W.inner);
      });
    }
  });
  at::parallel_for(0, cols, grain_for(partitions), [&](int64_t begin, int64_t end) {
    std::copy(partial.get() + begin, partial.get() + end, z.begin() + begin);
    for (int64_t p = 1; p < partitions; ++p)
      for (int64_t c = begin; c < end; ++c) z[c] += acc_t(partial[p * cols + c]);
  });
}

// x <- round_to_dtype(raw / max(|raw|, eps)); returns |raw|. Rounding through scalar_t mirrors torch, whose
// vectors live in the weight's dtype between steps.
template <typename scalar_t>
acc_t normalize_into(const Vector& raw, Vector& x, double eps) {
  acc_t sq = 0;
  for (acc_t value : raw) sq += value * value;
  const acc_t norm = std::sqrt(sq);
  const acc_t denom = std::max<acc_t>(norm, eps);
  for (size_t j = 0; j < raw.size(); ++j) x[j] = static_cast<acc_t>(static_cast<scalar_t>(raw[j] / denom));
  return norm;
}

// n rounds of power iteration on (u, v), in place; returns sigma = u^T W v for the final vectors.
// u-first (torch.nn.utils.parametrizations): u = N(W v), v = N(W^T u).  v-first (legacy torch): the reverse.
// After the last half-step the newest vector is N(x) with |x| = s, so u^T W v = s^2 / max(s, eps): no third pass.
// A round that meets a non-finite or zero vector would poison the buffers for ever (a zero vector stays zero):
// then u and v are restored to their inputs and only sigma (and so W / sigma) shows the problem.
template <typename scalar_t>
acc_t power_iterate(const Matrix3d<const scalar_t>& W, Vector& u, Vector& v, int64_t n, double eps, bool v_first) {
  Vector raw_u(u.size()), raw_v(v.size());
  if (n == 0) {
    matvec(W, v, raw_u);
    acc_t sigma = 0;
    for (size_t i = 0; i < u.size(); ++i) sigma += u[i] * raw_u[i];
    return sigma;
  }
  const Vector u_in = u, v_in = v;
  bool degenerate = false;
  acc_t last_norm = 0;
  auto usable = [](acc_t norm) { return std::isfinite(norm) && norm > 0; };
  for (int64_t k = 0; k < n; ++k) {
    if (v_first) {
      rmatvec(W, u, raw_v);
      degenerate |= !usable(normalize_into<scalar_t>(raw_v, v, eps));
      matvec(W, v, raw_u);
      last_norm = normalize_into<scalar_t>(raw_u, u, eps);
    } else {
      // u = N(y) with y = W v, and W^T u = W^T y / max(|y|, eps): one pass over W (matvec_and_gram).
      matvec_and_gram(W, v, raw_u, raw_v);
      const acc_t norm_y = normalize_into<scalar_t>(raw_u, u, eps);
      degenerate |= !usable(norm_y);
      const acc_t denom_y = std::max<acc_t>(norm_y, eps);
      for (acc_t& value : raw_v) value /= denom_y;
      last_norm = normalize_into<scalar_t>(raw_v, v, eps);
    }
    degenerate |= !usable(last_norm);
  }
  if (degenerate) {
    u = u_in;
    v = v_in;
  }
  return last_norm * last_norm / std::max<acc_t>(last_norm, eps);
}

}  // namespace
}  // namespace sn_ext
