// Building blocks of the CPU kernels (power_iteration.h and the *_cpu.cpp op files): strided views of
// weight-shaped tensors, dot products of several rows at once, row updates and vector loads/stores.
//
// Matrix-vector products and reductions accumulate in double for float32 and float64 weights and in float for the
// 2-byte dtypes (lane_t says why); sums of many partial results are added in double. For float32 weights each product
// of a weight and a vector element (a value of the weight's dtype) is exact in double (2 x 24 significand bits), so
// the only rounding is the double sum's: far below torch's own float32 BLAS error, even where a sum cancels (sigma =
// u^T W v with n_power_iterations = 0 on a 3x3x3x3 weight, where float32 sums reached 4x torch's error). Speed comes
// from kLanes independent accumulators per row and kRowBlock rows per sweep of x (one load of x serves kRowBlock
// rows), not from summing float32 weights in float: measured on this machine's AVX2 cores (1 thread), a row block of
// 4 with 8 double lanes runs at the speed of 16 float lanes (38 GB/s from L2/L3, 17-21 GB/s from memory; one double
// accumulator chain: 22 and 10-11 GB/s).
// Float64 weights keep dot_rows' one-accumulator sums (their products are not exact in double, and changing their order
// would change float64 results that tests compare at 1e-14).
// Every split depends on the shape only, never on the thread count: results are the same for any number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
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

// x as a float (a bfloat16 is the float whose high 16 bits it holds: c10's conversion gives the same value, but
// through a function GCC does not vectorize) or, for double, itself.
template <typename scalar_t>
inline auto to_float(scalar_t x) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    return x;
  } else {
    return static_cast<float>(x);
  }
}

// The type dot_rows and add_rows multiply and sum in, and so the type of the vectors they read: float for the 2-byte
// dtypes, double for float32 and float64. dot_rows' vector always holds values of the weight's dtype (load_vector
// reads them from the buffers, normalize_into rounds them so), and the product of two bfloat16 or two float16 values
// is exact in float (at most 2 x 11 significand bits): only the float lanes' sums round, at most n / 16 + 1 steps of
// 2^-24 each for a row of n, far below the 2^-9 of the bfloat16 result torch rounds its W v to. add_rows' y (W v
// before normalization) is rounded to float, and its sums (W^T y) run over the rows of a partition in float, as
// torch's own bfloat16 matrix-vector products accumulate in float over all rows. Float lanes carry twice the
// elements per instruction and save the conversion to double, which made the 2-byte dtypes compute-bound: bfloat16
// W v ran 2x slower than float32's, and W^T y 3x slower than W v, on this machine.
template <typename scalar_t>
using lane_t = std::conditional_t<sizeof(scalar_t) == 2, float, acc_t>;
template <typename scalar_t>
using LaneVector = std::vector<lane_t<scalar_t>>;

// A Vector (double) as lane_t, the type of dot_rows' and add_rows' vectors.
template <typename scalar_t>
LaneVector<scalar_t> to_lanes(const Vector& x) {
  return LaneVector<scalar_t>(x.begin(), x.end());
}

#if defined(__AVX2__) && defined(__FMA__)
// dot_rows' AVX2 loop for scalar_t: its lane registers and how a weight's values enter them. Float32 (4 doubles per
// register) and bfloat16 (8 floats), whose conversions are one or two vector instructions; float16 would need F16C,
// which the avx2 build does not enable, so it has none (kHas = false).
template <typename scalar_t>
struct Avx2Lanes {
  static constexpr bool kHas = false;
};

template <>
struct Avx2Lanes<float> {
  static constexpr bool kHas = true;
  static constexpr int64_t kWidth = 4;
  using reg = __m256d;
  static reg zero() { return _mm256_setzero_pd(); }
  static reg load(const double* x) { return _mm256_loadu_pd(x); }
  static reg widen(const float* w) { return _mm256_cvtps_pd(_mm_loadu_ps(w)); }  // to_float(), as doubles
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
  static void store(double* out, reg a) { _mm256_storeu_pd(out, a); }
};

template <>
struct Avx2Lanes<c10::BFloat16> {
  static constexpr bool kHas = true;
  static constexpr int64_t kWidth = 8;
  using reg = __m256;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* x) { return _mm256_loadu_ps(x); }
  static reg widen(const c10::BFloat16* w) {  // the values to_float() gives: the bits, 16 places up
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* out, reg a) { _mm256_storeu_ps(out, a); }
};
#endif

// Rows handled per sweep of the shared vector in dot_rows and add_rows.
constexpr int64_t kRowBlock = 4;
// Accumulators per row in dot_rows: two AVX2 registers of lane_t, so a row block keeps 8 FMA chains in flight.
template <typename scalar_t>
constexpr int64_t kLanes = 2 * 32 / sizeof(lane_t<scalar_t>);

// dot_rows' lanes for its first `full` elements (a multiple of kLanes), in AVX2 registers, two per row: GCC kept
// dot_rows' lane array on the stack and converted 2 values per instruction (bfloat16: 1.6x slower). Each product is
// exact, so the sums are those of dot_rows' generic loops. Returns false, adding nothing, where it does not apply
// (a build without AVX2 and FMA, float16, strided rows): dot_rows' generic loops add them then.
template <int64_t NR, typename scalar_t>
bool add_full_lane_groups_avx2(const scalar_t* w, int64_t w_row, int64_t s, const lane_t<scalar_t>* x, int64_t full,
                               lane_t<scalar_t> (&lanes)[NR][kLanes<scalar_t>]) {
#if defined(__AVX2__) && defined(__FMA__)
  using A = Avx2Lanes<scalar_t>;
  if constexpr (A::kHas) {
    if (s == 1) {
      static_assert(kLanes<scalar_t> == 2 * A::kWidth, "two registers per row");
      typename A::reg lo[NR], hi[NR];
      for (int64_t q = 0; q < NR; ++q) lo[q] = hi[q] = A::zero();
      for (int64_t r = 0; r < full; r += 2 * A::kWidth) {
        const typename A::reg x_lo = A::load(x + r), x_hi = A::load(x + r + A::kWidth);
        for (int64_t q = 0; q < NR; ++q) {
          lo[q] = A::fma(A::widen(w + q * w_row + r), x_lo, lo[q]);
          hi[q] = A::fma(A::widen(w + q * w_row + r + A::kWidth), x_hi, hi[q]);
        }
      }
      for (int64_t q = 0; q < NR; ++q) {
        A::store(lanes[q], lo[q]);
        A::store(lanes[q] + A::kWidth, hi[q]);
      }
      return true;
    }
  }
#endif
  return false;
}

// lanes[0] + ... + lanes[L - 1] in double, added pairwise: (0 + L/2, ...), then halves again.
template <typename lane, int64_t L>
acc_t pairwise_sum(const lane (&lanes)[L]) {
  acc_t sums[L];
  for (int64_t k = 0; k < L; ++k) sums[k] = lanes[k];
  for (int64_t width = L / 2; width >= 1; width /= 2)
    for (int64_t k = 0; k < width; ++k) sums[k] += sums[k + width];
  return sums[0];
}

// out[q] = sum over r < n of w[q * w_row + r * s] * x[r] for q < NR: NR rows dotted with one vector, which is read
// once for all of them. Float data: element r goes to lane r % kLanes and the lanes are added pairwise (in double),
// so a row's result depends only on the row and x, not on NR, the strides or which task ran it. Double data: one
// accumulator, the sum these kernels have always used for float64.
template <int64_t NR, typename scalar_t>
void dot_rows(const scalar_t* w, int64_t w_row, int64_t s, const lane_t<scalar_t>* x, int64_t n, acc_t* out) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t q = 0; q < NR; ++q) {
      const scalar_t* row = w + q * w_row;
      acc_t sum = 0;
      if (s == 1) {
#pragma omp simd reduction(+ : sum)
        for (int64_t r = 0; r < n; ++r) sum += row[r] * x[r];
      } else {
        for (int64_t r = 0; r < n; ++r) sum += row[r * s] * x[r];
      }
      out[q] = sum;
    }
  } else {
    using lane = lane_t<scalar_t>;
    constexpr int64_t L = kLanes<scalar_t>;
    lane lanes[NR][L] = {};
    const int64_t full = n - n % L;
    if (!add_full_lane_groups_avx2<NR>(w, w_row, s, x, full, lanes)) {
      if (s == 1) {
        for (int64_t r = 0; r < full; r += L)
          for (int64_t q = 0; q < NR; ++q) {
#pragma omp simd
            for (int64_t k = 0; k < L; ++k) lanes[q][k] += to_float(w[q * w_row + r + k]) * x[r + k];
          }
      } else {
        for (int64_t r = 0; r < full; r += L)
          for (int64_t q = 0; q < NR; ++q)
            for (int64_t k = 0; k < L; ++k) lanes[q][k] += to_float(w[q * w_row + (r + k) * s]) * x[r + k];
      }
    }
    for (int64_t r = full; r < n; ++r)
      for (int64_t q = 0; q < NR; ++q) lanes[q][r - full] += to_float(w[q * w_row + r * s]) * x[r];
    for (int64_t q = 0; q < NR; ++q) out[q] = pairwise_sum(lanes[q]);
  }
}

// z[r] += y[0] * w[r * s] + ... + y[NR - 1] * w[(NR - 1) * w_row + r * s] for r in [r0, r1), the rows added one
// after another to each element: the same roundings as NR separate sweeps, with one read and write of z. In lane_t:
// double for float32 and float64, float for the 2-byte dtypes.
template <int64_t NR, typename scalar_t>
void add_rows(const scalar_t* w, int64_t w_row, int64_t s, const lane_t<scalar_t>* y, lane_t<scalar_t>* z, int64_t r0,
              int64_t r1) {
  if (s == 1) {
#pragma omp simd
    for (int64_t r = r0; r < r1; ++r) {
      lane_t<scalar_t> t = z[r];
      for (int64_t q = 0; q < NR; ++q) t += y[q] * to_float(w[q * w_row + r]);
      z[r] = t;
    }
  } else {
    for (int64_t r = r0; r < r1; ++r) {
      lane_t<scalar_t> t = z[r];
      for (int64_t q = 0; q < NR; ++q) t += y[q] * to_float(w[q * w_row + r * s]);
      z[r] = t;
    }
  }
}

// A vector of the weight's dtype, as T (double by default).
template <typename scalar_t, typename T = acc_t>
std::vector<T> load_vector(const at::Tensor& t) {
  const auto c = t.contiguous();
  const scalar_t* p = c.const_data_ptr<scalar_t>();
  return std::vector<T>(p, p + c.numel());
}

template <typename scalar_t>
void store_vector(const Vector& x, at::Tensor& out) {
  at::Tensor dst = out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
  scalar_t* p = dst.mutable_data_ptr<scalar_t>();
  for (size_t j = 0; j < x.size(); ++j) p[j] = static_cast<scalar_t>(x[j]);
  if (!dst.is_same(out)) out.copy_(dst);
}

// The value of a one-element CPU tensor of a floating dtype, read in place: item() is a dispatched op (~1 us, a few
// percent of a small layer's step). A tensor on another device (a sigma the caller moved) takes item().
inline double scalar_value(const at::Tensor& t) {
  if (!t.device().is_cpu()) return t.item<double>();
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "scalar_value",
                                  [&] { value = static_cast<double>(*t.const_data_ptr<scalar_t>()); });
  return value;
}

// Writes `value` into a new one-element CPU tensor of a floating dtype, in place (fill_ is a dispatched op).
inline void set_scalar_value(at::Tensor& t, double value) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "set_scalar_value",
                                  [&] { *t.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(value); });
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
