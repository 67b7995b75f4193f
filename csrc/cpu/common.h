// Building blocks of the CPU kernels (power_iteration.h and the *_cpu.cpp op files): strided views of
// weight-shaped tensors, dot products and vector loads/stores.
// Matrix-vector products and reductions accumulate in double for every weight dtype: on a memory-bound pass this
// costs nothing and keeps sn_ext's rounding error below torch's own fp32 BLAS error.
// Reductions are split into fixed pieces summed in order, so results do not depend on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sn_ext {
namespace {

using acc_t = double;
using Vector = std::vector<acc_t>;

// Elements of W handled by one parallel task; smaller layers run on one thread (no fork/join cost).
constexpr int64_t kGrainElements = 1 << 15;

inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

// A strided (outer, rows, inner) view of a weight-shaped tensor; see matrix_view.h.
template <typename T>
struct Matrix3d {
  T* data;
  int64_t outer, rows, inner;
  int64_t s_outer, s_row, s_inner;

  explicit Matrix3d(const at::Tensor& t3)
      : data(static_cast<T*>(t3.data_ptr())),
        outer(t3.size(0)),
        rows(t3.size(1)),
        inner(t3.size(2)),
        s_outer(t3.stride(0)),
        s_row(t3.stride(1)),
        s_inner(t3.stride(2)) {}

  int64_t cols() const { return outer * inner; }
  int64_t lines() const { return outer * rows; }
  // Line l = o * rows + i holds the elements Wm[i, o * inner + r] for r in [0, inner).
  T* line(int64_t l) const { return data + (l / rows) * s_outer + (l % rows) * s_row; }
  T* line(int64_t o, int64_t i) const { return data + o * s_outer + i * s_row; }
};

template <typename scalar_t>
acc_t dot(const scalar_t* w, int64_t stride, const acc_t* x, int64_t n) {
  acc_t sum = 0;
  if (stride == 1) {
#pragma omp simd reduction(+ : sum)
    for (int64_t r = 0; r < n; ++r) sum += static_cast<acc_t>(w[r]) * x[r];
  } else {
    for (int64_t r = 0; r < n; ++r) sum += static_cast<acc_t>(w[r * stride]) * x[r];
  }
  return sum;
}

template <typename scalar_t>
Vector load_vector(const at::Tensor& t) {
  const auto c = t.contiguous();
  const scalar_t* p = c.const_data_ptr<scalar_t>();
  return Vector(p, p + c.numel());
}

template <typename scalar_t>
void store_vector(const Vector& x, at::Tensor& out) {
  at::Tensor dst = out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
  scalar_t* p = dst.mutable_data_ptr<scalar_t>();
  for (size_t j = 0; j < x.size(); ++j) p[j] = static_cast<scalar_t>(x[j]);
  if (!dst.is_same(out)) out.copy_(dst);
}

// Calls body(r, offset_a, offset_b) for r in [0, n) along a line read with stride a and written with stride b;
// the unit-stride case (every contiguous weight) is a separate loop the compiler vectorizes.
template <typename Body>
inline void for_each_in_line(int64_t n, int64_t stride_a, int64_t stride_b, const Body& body) {
  if (stride_a == 1 && stride_b == 1) {
#pragma omp simd
    for (int64_t r = 0; r < n; ++r) body(r, r, r);
  } else {
    for (int64_t r = 0; r < n; ++r) body(r, r * stride_a, r * stride_b);
  }
}

}  // namespace
}  // namespace sn_ext
