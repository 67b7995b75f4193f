// Building blocks of the CPU kernels (power_iteration.h and the *_cpu.cpp op files): strided views of
// weight-shaped tensors, blocked dot products and sums, vector loads/stores.
//
// Sums run in the weight dtype's op-math type (acc_t: float for float32, float16 and bfloat16 weights, double for
// float64), the type torch's own CPU kernels and Inductor sum in: a float lane holds twice the elements of a double
// one and needs no conversion from a float32 weight. What keeps the float error small is the order of the sums:
// kLanes independent accumulators over blocks of at most kBlock elements, the lanes added pairwise, and blocks (and a
// matrix's row partitions) added pairwise. A sum of n terms thus goes through at most
// kBlock / kLanes + log2(kLanes) + ceil(log2(n / kBlock)) + 1 roundings (docs/guarantees.md states the bound).
// (power_iteration.h does the O(length) work on u and v in double: it costs nothing next to a pass over W.)
// Every split depends on the shape only, never on the thread count: results are the same for any number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace sn_ext {
namespace {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;
template <typename T>
using Vector = std::vector<T>;

// Independent accumulators per block: two AVX2 registers of float (four of double), enough to hide the add latency.
constexpr int64_t kLanes = 16;
// Elements summed into the lanes before a block's sum joins the pairwise tree: 16 terms per lane at most.
constexpr int64_t kBlock = 256;

// Elements of W handled by one parallel task; smaller layers run on one thread (no fork/join cost).
constexpr int64_t kGrainElements = 1 << 15;

inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// a * b + c with one rounding where the build targets FMA (the vector units' fast path); two roundings otherwise.
template <typename T>
inline T mul_add(T a, T b, T c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// piece(begin) + ... + piece(end - 1), the range halved until one piece is left: ceil(log2(count)) additions deep.
template <typename T, typename Piece>
T pairwise_sum(int64_t begin, int64_t end, const Piece& piece) {
  if (end - begin <= 1) return end > begin ? piece(begin) : T(0);
  const int64_t mid = begin + (end - begin) / 2;
  return pairwise_sum<T>(begin, mid, piece) + pairwise_sum<T>(mid, end, piece);
}

// lanes[0] + ... + lanes[kLanes - 1], pairwise (log2(kLanes) additions deep).
template <typename T>
T sum_lanes(T (&lanes)[kLanes]) {
  for (int64_t width = kLanes / 2; width >= 1; width /= 2)
    for (int64_t k = 0; k < width; ++k) lanes[k] += lanes[k + width];
  return lanes[0];
}

// sum over r < n <= kBlock of a[r * sa] * b[r * sb], in T, kLanes terms at a time; the unit-stride case (every
// contiguous weight) is a loop the compiler vectorizes.
template <typename T, typename A, typename B>
T dot_block(const A* a, int64_t sa, const B* b, int64_t sb, int64_t n) {
  T lanes[kLanes] = {};
  const int64_t full = n - n % kLanes;
  if (sa == 1 && sb == 1) {
    for (int64_t r = 0; r < full; r += kLanes) {
#pragma omp simd
      for (int64_t k = 0; k < kLanes; ++k)
        lanes[k] = mul_add(static_cast<T>(a[r + k]), static_cast<T>(b[r + k]), lanes[k]);
    }
  } else {
    for (int64_t r = 0; r < full; r += kLanes)
      for (int64_t k = 0; k < kLanes; ++k)
        lanes[k] = mul_add(static_cast<T>(a[(r + k) * sa]), static_cast<T>(b[(r + k) * sb]), lanes[k]);
  }
  for (int64_t r = full; r < n; ++r)
    lanes[r - full] = mul_add(static_cast<T>(a[r * sa]), static_cast<T>(b[r * sb]), lanes[r - full]);
  return sum_lanes(lanes);
}

// sum over r < n of a[r * sa] * b[r * sb] in T: blocks of kBlock, added pairwise.
template <typename T, typename A, typename B>
T dot(const A* a, int64_t sa, const B* b, int64_t sb, int64_t n) {
  return pairwise_sum<T>(0, ceil_div(n, kBlock), [&](int64_t k) {
    const int64_t start = k * kBlock;
    return dot_block<T>(a + start * sa, sa, b + start * sb, sb, std::min(kBlock, n - start));
  });
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
Vector<acc_type<scalar_t>> load_vector(const at::Tensor& t) {
  const auto c = t.contiguous();
  const scalar_t* p = c.const_data_ptr<scalar_t>();
  return Vector<acc_type<scalar_t>>(p, p + c.numel());
}

template <typename scalar_t>
void store_vector(const Vector<acc_type<scalar_t>>& x, at::Tensor& out) {
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
