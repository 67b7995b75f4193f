// Power iteration on the CPU, shared by power_iteration_ (power_iteration_cpu.cpp) and spectral_normalize
// (spectral_normalize_cpu.cpp): the matrix-vector products and power_iterate(), which runs the rounds.
// Sums in acc_type<scalar_t>, blocked and pairwise (common.h): a row's dot product is a pairwise sum of blocks, and
// W^T y is summed in order over partitions of kRowsPerPartition rows, whose partial vectors are then added pairwise.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace sn_ext {
namespace {

// Rows of W whose terms of W^T y are added in order into one partial vector; more only where the partials of a
// huge weight would pass kMaxPartialElements.
constexpr int64_t kRowsPerPartition = 32;
constexpr int64_t kMaxPartialElements = int64_t(1) << 22;
// Columns of W^T y per parallel task when tasks split the columns.
constexpr int64_t kMinColumnChunk = 64;

struct RowPartitions {
  int64_t rows_each, count;
};

inline RowPartitions row_partitions(int64_t rows, int64_t cols) {
  const int64_t rows_each = std::max(kRowsPerPartition, ceil_div(rows * cols, kMaxPartialElements));
  return {rows_each, ceil_div(rows, rows_each)};
}

// (row i of Wm) . x: the row's outer segments added pairwise, each a blocked dot product.
template <typename scalar_t, typename T>
T row_dot(const Matrix3d<const scalar_t>& W, int64_t i, const T* x) {
  return pairwise_sum<T>(0, W.outer,
                         [&](int64_t o) { return dot<T>(W.line(o, i), W.s_inner, x + o * W.inner, 1, W.inner); });
}

// y = Wm x, parallel over rows.
template <typename scalar_t, typename T>
void matvec(const Matrix3d<const scalar_t>& W, const Vector<T>& x, Vector<T>& y) {
  at::parallel_for(0, W.rows, grain_for(W.cols()), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) y[i] = row_dot(W, i, x.data());
  });
}

// z[c] += a * Wm[i, c] for the columns c in [c0, c1), walked as segments of constant o (columns o * inner + r).
template <typename scalar_t, typename T>
void add_row(const Matrix3d<const scalar_t>& W, int64_t i, T a, T* z, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1;) {
    const int64_t o = c / W.inner, r0 = c % W.inner, r1 = std::min(W.inner, r0 + (c1 - c));
    const scalar_t* w = W.line(o, i);
    T* zo = z + o * W.inner;
    if (W.s_inner == 1) {
#pragma omp simd
      for (int64_t r = r0; r < r1; ++r) zo[r] = mul_add(a, static_cast<T>(w[r]), zo[r]);
    } else {
      for (int64_t r = r0; r < r1; ++r) zo[r] = mul_add(a, static_cast<T>(w[r * W.s_inner]), zo[r]);
    }
    c += r1 - r0;
  }
}

// Over the columns [c0, c1): z = the pairwise sum of the `count` partial vectors (each `cols` long) in `partial`,
// which the sum overwrites.
template <typename T>
void sum_partials(T* partial, int64_t count, int64_t cols, int64_t c0, int64_t c1, T* z) {
  for (int64_t step = 1; step < count; step *= 2) {
    for (int64_t p = 0; p + step < count; p += 2 * step) {
      T* dst = partial + p * cols;
      const T* src = partial + (p + step) * cols;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
  std::copy(partial + c0, partial + c1, z + c0);
}

// Each partition's partial vector (cols long, zeroed) += y_i * (row i of Wm) for its rows in order, the partitions in
// parallel; y_i = weight_of(i), which may compute it.
template <typename scalar_t, typename T, typename RowWeight>
void accumulate_partitions(const Matrix3d<const scalar_t>& W, const RowPartitions& parts, T* partial,
                           const RowWeight& weight_of) {
  const int64_t cols = W.cols();
  at::parallel_for(0, parts.count, grain_for(parts.rows_each * cols), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t i = p * parts.rows_each; i < std::min(W.rows, (p + 1) * parts.rows_each); ++i)
        add_row(W, i, weight_of(i), partial + p * cols, 0, cols);
  });
}

// z = the pairwise sum of the partitions' partial vectors, parallel over column chunks.
template <typename T>
void sum_partitions(const RowPartitions& parts, T* partial, Vector<T>& z) {
  const int64_t cols = static_cast<int64_t>(z.size());
  at::parallel_for(0, cols, std::max(kMinColumnChunk, grain_for(parts.count)),
                   [&](int64_t c0, int64_t c1) { sum_partials(partial, parts.count, cols, c0, c1, z.data()); });
}

// Whether W has too few row partitions to share them out among the threads, while being large enough to run in
// parallel at all: then W^T y is split by columns instead. Either way the sums and their order are the same (so is
// the result, whatever the thread count); only the split of the work differs.
inline bool split_by_columns(const RowPartitions& parts, int64_t elements) {
  return parts.count < 2 * at::get_num_threads() && elements >= 2 * kGrainElements;
}

// z = Wm^T y, parallel over partitions, or over column chunks for a wide W (each task owns its columns of every
// partition's partial vector).
template <typename scalar_t, typename T>
void rmatvec(const Matrix3d<const scalar_t>& W, const Vector<T>& y, Vector<T>& z) {
  const int64_t cols = W.cols();
  const RowPartitions parts = row_partitions(W.rows, cols);
  Vector<T> partial(parts.count * cols);
  if (!split_by_columns(parts, W.rows * cols)) {
    accumulate_partitions(W, parts, partial.data(), [&](int64_t i) { return y[i]; });
    sum_partitions(parts, partial.data(), z);
    return;
  }
  at::parallel_for(0, cols, std::max(kMinColumnChunk, grain_for(W.rows)), [&](int64_t c0, int64_t c1) {
    for (int64_t i = 0; i < W.rows; ++i) add_row(W, i, y[i], partial.data() + (i / parts.rows_each) * cols, c0, c1);
    sum_partials(partial.data(), parts.count, cols, c0, c1, z.data());
  });
}

// y = Wm x and z = Wm^T y in ONE pass over W: each row is dotted with x, then added into its partition's partial z
// scaled by y_i while it is still in L1. A u-first round needs W^T u = W^T y / max(|y|, eps), so this halves its
// memory traffic. A wide W (split_by_columns) takes two passes instead, matvec and rmatvec, both parallel.
template <typename scalar_t, typename T>
void matvec_and_gram(const Matrix3d<const scalar_t>& W, const Vector<T>& x, Vector<T>& y, Vector<T>& z) {
  const RowPartitions parts = row_partitions(W.rows, W.cols());
  if (split_by_columns(parts, W.rows * W.cols())) {
    matvec(W, x, y);
    rmatvec(W, y, z);
    return;
  }
  Vector<T> partial(parts.count * W.cols());
  accumulate_partitions(W, parts, partial.data(), [&](int64_t i) { return y[i] = row_dot(W, i, x.data()); });
  sum_partitions(parts, partial.data(), z);
}

// x <- round_to_dtype(y / max(|y|, eps)) for y = raw / divisor; returns |y|. The O(length) work runs in double (it
// costs nothing next to a pass over W, and keeps the vectors' error that of the sums in raw). Rounding through
// scalar_t mirrors torch, whose vectors live in the weight's dtype between steps.
template <typename scalar_t, typename T>
double normalize_into(const Vector<T>& raw, Vector<T>& x, double eps, double divisor = 1) {
  const double norm = std::sqrt(dot<double>(raw.data(), 1, raw.data(), 1, static_cast<int64_t>(raw.size()))) / divisor;
  const double denom = divisor * std::max(norm, eps);
  for (size_t j = 0; j < raw.size(); ++j) x[j] = static_cast<T>(static_cast<scalar_t>(raw[j] / denom));
  return norm;
}

// n rounds of power iteration on (u, v), in place; returns sigma = u^T W v for the final vectors.
// u-first (torch.nn.utils.parametrizations): u = N(W v), v = N(W^T u).  v-first (legacy torch): the reverse.
// After the last half-step the newest vector is N(x) with |x| = s, so u^T W v = s^2 / max(s, eps): no third pass.
// A round that meets a non-finite or zero vector would poison the buffers for ever (a zero vector stays zero):
// then u and v are restored to their inputs and only sigma (and so W / sigma) shows the problem.
template <typename scalar_t, typename T>
double power_iterate(const Matrix3d<const scalar_t>& W, Vector<T>& u, Vector<T>& v, int64_t n, double eps,
                     bool v_first) {
  Vector<T> raw_u(u.size()), raw_v(v.size());
  if (n == 0) {
    matvec(W, v, raw_u);
    return dot<double>(u.data(), 1, raw_u.data(), 1, static_cast<int64_t>(u.size()));
  }
  const Vector<T> u_in = u, v_in = v;
  bool degenerate = false;
  double last_norm = 0;
  auto usable = [](double norm) { return std::isfinite(norm) && norm > 0; };
  for (int64_t k = 0; k < n; ++k) {
    if (v_first) {
      rmatvec(W, u, raw_v);
      degenerate |= !usable(normalize_into<scalar_t>(raw_v, v, eps));
      matvec(W, v, raw_u);
      last_norm = normalize_into<scalar_t>(raw_u, u, eps);
    } else {
      // u = N(y) with y = W v, and W^T u = W^T y / max(|y|, eps): one pass over W (matvec_and_gram).
      matvec_and_gram(W, v, raw_u, raw_v);
      const double norm_y = normalize_into<scalar_t>(raw_u, u, eps);
      degenerate |= !usable(norm_y);
      last_norm = normalize_into<scalar_t>(raw_v, v, eps, std::max(norm_y, eps));
    }
    degenerate |= !usable(last_norm);
  }
  if (degenerate) {
    u = u_in;
    v = v_in;
  }
  return last_norm * last_norm / std::max(last_norm, eps);
}

}  // namespace
}  // namespace sn_ext
