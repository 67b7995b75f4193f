// Building blocks of the CPU kernels (power_iteration.h and the *_cpu.cpp op files): strided views of
// weight-shaped tensors, dot products of several rows at once, row updates and vector loads/stores.
//
// Matrix-vector products and reductions accumulate in double for every weight dtype. For float32, float16 and
// bfloat16 weights each product of two such values is exact in double (at most 2 x 24 significand bits), so the only
// rounding is the double sum's: far below torch's own float32 BLAS error, even where a sum cancels (sigma = u^T W v
// with n_power_iterations = 0 on a 3x3x3x3 weight, where float32 sums reached 4x torch's error). Speed comes from
// kLanes independent double accumulators per row and kRowBlock rows per sweep of x (one load of x serves kRowBlock
// rows), not from summing in float: measured on this machine's AVX2 cores (1 thread), a row block of 4 with 8
// double lanes runs at the speed of 16 float lanes (38 GB/s from L2/L3, 17-21 GB/s from memory; one double
// accumulator chain: 22 and 10-11 GB/s).
// Float64 weights keep the one-accumulator sums (their products are not exact in double, and changing their order
// would change float64 results that tests compare at 1e-14).
// Every split depends on the shape only, never on the thread count: results are the same for any number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

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

// x as a double. A bfloat16 is the float whose high 16 bits it holds: c10's conversion gives the same value, but
// through a function GCC does not vectorize.
template <typename scalar_t>
inline acc_t widen(scalar_t x) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  } else {
    return static_cast<acc_t>(x);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// Whether dot_rows has an AVX2 loop for scalar_t: float32 and bfloat16, whose conversion to float is one vector
// instruction (float16 would need F16C, which the avx2 build does not enable).
template <typename scalar_t>
constexpr bool kWidenAvx2 = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

// w[0..3] as doubles: the values widen() gives.
template <typename scalar_t>
inline __m256d widen4(const scalar_t* w) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_cvtps_pd(_mm_loadu_ps(w));
  } else {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w));
    return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
  }
}
#endif

// Rows handled per sweep of the shared vector in dot_rows and add_rows.
constexpr int64_t kRowBlock = 4;
// Double accumulators per row in dot_rows: two AVX2 registers, so a row block keeps 8 FMA chains in flight.
constexpr int64_t kLanes = 8;

// dot_rows' lanes for its first `full` elements (a multiple of kLanes), in AVX2 registers, two per row: GCC kept
// dot_rows' lane array on the stack and converted 2 values per instruction (bfloat16: 1.6x slower). Each product is
// exact, so the sums are those of dot_rows' generic loops. Returns false, adding nothing, where it does not apply
// (a build without AVX2 and FMA, float16, strided rows): dot_rows' generic loops add them then.
template <int64_t NR, typename scalar_t>
bool add_full_lane_groups_avx2(const scalar_t* w, int64_t w_row, int64_t s, const acc_t* x, int64_t full,
                               acc_t (&lanes)[NR][kLanes]) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (kWidenAvx2<scalar_t>) {
    if (s == 1) {
      static_assert(kLanes == 8, "two __m256d per row");
      __m256d lo[NR], hi[NR];
      for (int64_t q = 0; q < NR; ++q) lo[q] = hi[q] = _mm256_setzero_pd();
      for (int64_t r = 0; r < full; r += kLanes) {
        const __m256d x_lo = _mm256_loadu_pd(x + r), x_hi = _mm256_loadu_pd(x + r + 4);
        for (int64_t q = 0; q < NR; ++q) {
          lo[q] = _mm256_fmadd_pd(widen4(w + q * w_row + r), x_lo, lo[q]);
          hi[q] = _mm256_fmadd_pd(widen4(w + q * w_row + r + 4), x_hi, hi[q]);
        }
      }
      for (int64_t q = 0; q < NR; ++q) {
        _mm256_storeu_pd(lanes[q], lo[q]);
        _mm256_storeu_pd(lanes[q] + 4, hi[q]);
      }
      return true;
    }
  }
#endif
  return false;
}

// out[q] = sum over r < n of w[q * w_row + r * s] * x[r] for q < NR: NR rows dotted with one vector, which is read
// once for all of them. Float data: element r goes to lane r % kLanes and the lanes are added pairwise, so a row's
// result depends only on the row and x, not on NR, the strides or which task ran it. Double data: one accumulator,
// the sum these kernels have always used for float64.
template <int64_t NR, typename scalar_t>
void dot_rows(const scalar_t* w, int64_t w_row, int64_t s, const acc_t* x, int64_t n, acc_t* out) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t q = 0; q < NR; ++q) {
      const scalar_t* row = w + q * w_row;
      acc_t sum = 0;
      if (s == 1) {
#pragma omp simd reduction(+ : sum)
        for (int64_t r = 0; r < n; ++r) sum += widen(row[r]) * x[r];
      } else {
        for (int64_t r = 0; r < n; ++r) sum += widen(row[r * s]) * x[r];
      }
      out[q] = sum;
    }
  } else {
    acc_t lanes[NR][kLanes] = {};
    const int64_t full = n - n % kLanes;
    if (!add_full_lane_groups_avx2<NR>(w, w_row, s, x, full, lanes)) {
      if (s == 1) {
        for (int64_t r = 0; r < full; r += kLanes)
          for (int64_t q = 0; q < NR; ++q) {
#pragma omp simd
            for (int64_t k = 0; k < kLanes; ++k) lanes[q][k] += widen(w[q * w_row + r + k]) * x[r + k];
          }
      } else {
        for (int64_t r = 0; r < full; r += kLanes)
          for (int64_t q = 0; q < NR; ++q)
            for (int64_t k = 0; k < kLanes; ++k) lanes[q][k] += widen(w[q * w_row + (r + k) * s]) * x[r + k];
      }
    }
    for (int64_t r = full; r < n; ++r)
      for (int64_t q = 0; q < NR; ++q) lanes[q][r - full] += widen(w[q * w_row + r * s]) * x[r];
    for (int64_t q = 0; q < NR; ++q) {
      for (int64_t width = kLanes / 2; width >= 1; width /= 2)
        for (int64_t k = 0; k < width; ++k) lanes[q][k] += lanes[q][k + width];
      out[q] = lanes[q][0];
    }
  }
}

// z[r] += y[0] * w[r * s] + ... + y[NR - 1] * w[(NR - 1) * w_row + r * s] for r in [r0, r1), the rows added one
// after another to each element: the same roundings as NR separate sweeps, with one read and write of z.
template <int64_t NR, typename scalar_t>
void add_rows(const scalar_t* w, int64_t w_row, int64_t s, const acc_t* y, acc_t* z, int64_t r0, int64_t r1) {
  if (s == 1) {
#pragma omp simd
    for (int64_t r = r0; r < r1; ++r) {
      acc_t t = z[r];
      for (int64_t q = 0; q < NR; ++q) t += y[q] * widen(w[q * w_row + r]);
      z[r] = t;
    }
  } else {
    for (int64_t r = r0; r < r1; ++r) {
      acc_t t = z[r];
      for (int64_t q = 0; q < NR; ++q) t += y[q] * widen(w[q * w_row + r * s]);
      z[r] = t;
    }
  }
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

// Calls block(rows, i) over [begin, end): rows = std::integral_constant<int64_t, kRowBlock> for the row blocks
// starting at begin, begin + kRowBlock, ..., then std::integral_constant<int64_t, 1> for each row left over.
template <typename Block>
inline void for_each_row_block(int64_t begin, int64_t end, const Block& block) {
  int64_t i = begin;
  for (; i + kRowBlock <= end; i += kRowBlock) block(std::integral_constant<int64_t, kRowBlock>{}, i);
  for (; i < end; ++i) block(std::integral_constant<int64_t, 1>{}, i);
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
