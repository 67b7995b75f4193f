// Fused CPU kernels: one call does a layer's whole forward (power iteration, sigma, W / sigma), one its backward.
// Matrix-vector products and reductions accumulate in double for every weight dtype: on a memory-bound pass this
// costs nothing and keeps sn_ext's rounding error below torch's own fp32 BLAS error.
// Reductions are split into fixed pieces summed in order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../matrix_view.h"

namespace sn_ext {
namespace {

using acc_t = double;
using Vector = std::vector<acc_t>;

// Elements of W handled by one parallel task; smaller layers run on one thread (no fork/join cost).
constexpr int64_t kGrainElements = 1 << 15;

int64_t grain_for(int64_t elements_per_item) {
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

// y = Wm x
template <typename scalar_t>
void matvec(const Matrix3d<const scalar_t>& W, const Vector& x, Vector& y) {
  at::parallel_for(0, W.rows, grain_for(W.cols()), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t sum = 0;
      for (int64_t o = 0; o < W.outer; ++o) sum += dot(W.line(o, i), W.s_inner, x.data() + o * W.inner, W.inner);
      y[i] = sum;
    }
  });
}

// z = Wm^T y, parallel over column chunks (each task owns its slice of z: no reduction across tasks).
template <typename scalar_t>
void rmatvec(const Matrix3d<const scalar_t>& W, const Vector& y, Vector& z) {
  const int64_t chunk_grain = std::max<int64_t>(64, grain_for(W.rows));
  at::parallel_for(0, W.cols(), chunk_grain, [&](int64_t begin, int64_t end) {
    std::fill(z.begin() + begin, z.begin() + end, acc_t(0));
    // Walk [begin, end) as segments of constant o: columns o * inner + [r0, r1).
    for (int64_t c = begin; c < end;) {
      const int64_t o = c / W.inner, r0 = c % W.inner, r1 = std::min(W.inner, r0 + (end - c));
      acc_t* zo = z.data() + o * W.inner;
      for (int64_t i = 0; i < W.rows; ++i) {
        const scalar_t* w = W.line(o, i);
        const acc_t yi = y[i];
        if (W.s_inner == 1) {
#pragma omp simd
          for (int64_t r = r0; r < r1; ++r) zo[r] += yi * static_cast<acc_t>(w[r]);
        } else {
          for (int64_t r = r0; r < r1; ++r) zo[r] += yi * static_cast<acc_t>(w[r * W.s_inner]);
        }
      }
      c += r1 - r0;
    }
  });
}

// y = Wm x and z = Wm^T y in ONE pass over W: each row is dotted with x, then added into z scaled by y_i while
// it is still in L1. A u-first round needs W^T u = W^T y / max(|y|, eps), so this halves its memory traffic.
// Rows are split into partitions that depend only on the shape, each with its own partial z, summed in order:
// the result does not depend on the thread count.
template <typename scalar_t>
void matvec_and_gram(const Matrix3d<const scalar_t>& W, const Vector& x, Vector& y, Vector& z) {
  const int64_t cols = W.cols();
  constexpr int64_t kMaxPartialElements = int64_t(1) << 22;  // 32 MB of double partial sums at most
  const int64_t partitions = std::max<int64_t>(
      1, std::min({W.rows, (W.rows * cols) / kGrainElements, int64_t(64), kMaxPartialElements / cols}));
  const int64_t rows_per_partition = (W.rows + partitions - 1) / partitions;
  std::vector<acc_t> partial(partitions * cols);
  at::parallel_for(0, partitions, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      acc_t* zp = partial.data() + p * cols;
      for (int64_t i = p * rows_per_partition; i < std::min(W.rows, (p + 1) * rows_per_partition); ++i) {
        acc_t yi = 0;
        for (int64_t o = 0; o < W.outer; ++o) yi += dot(W.line(o, i), W.s_inner, x.data() + o * W.inner, W.inner);
        y[i] = yi;
        for (int64_t o = 0; o < W.outer; ++o) {
          const scalar_t* w = W.line(o, i);
          acc_t* zo = zp + o * W.inner;
          if (W.s_inner == 1) {
#pragma omp simd
            for (int64_t r = 0; r < W.inner; ++r) zo[r] += yi * static_cast<acc_t>(w[r]);
          } else {
            for (int64_t r = 0; r < W.inner; ++r) zo[r] += yi * static_cast<acc_t>(w[r * W.s_inner]);
          }
        }
      }
    }
  });
  std::copy(partial.begin(), partial.begin() + cols, z.begin());
  for (int64_t p = 1; p < partitions; ++p)
    for (int64_t c = 0; c < cols; ++c) z[c] += partial[p * cols + c];
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

// out = W / sigma in the dtype's op-math type, as a product with 1 / sigma: at most one rounding step from
// torch's `weight / sigma`, and several times faster where the pass is not bound by memory.
template <typename scalar_t>
void divide(const Matrix3d<const scalar_t>& W, at::opmath_type<scalar_t> sigma, const Matrix3d<scalar_t>& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t inv_sigma = opmath_t(1) / sigma;
  at::parallel_for(0, W.lines(), grain_for(W.inner), [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const scalar_t* w = W.line(l);
      scalar_t* y = out.line(l);
      for_each_in_line(W.inner, W.s_inner, out.s_inner, [&](int64_t, int64_t a, int64_t b) {
        y[b] = static_cast<scalar_t>(static_cast<opmath_t>(w[a]) * inv_sigma);
      });
    }
  });
}

// <A, B> over two weight-shaped views, one partial sum per line, then added in line order (deterministic).
template <typename scalar_t>
acc_t inner_product(const Matrix3d<const scalar_t>& A, const Matrix3d<const scalar_t>& B) {
  Vector partial(A.lines());
  at::parallel_for(0, A.lines(), grain_for(A.inner), [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const scalar_t* a = A.line(l);
      const scalar_t* b = B.line(l);
      acc_t sum = 0;
      if (A.s_inner == 1 && B.s_inner == 1) {
#pragma omp simd reduction(+ : sum)
        for (int64_t r = 0; r < A.inner; ++r) sum += static_cast<acc_t>(a[r]) * static_cast<acc_t>(b[r]);
      } else {
        for (int64_t r = 0; r < A.inner; ++r)
          sum += static_cast<acc_t>(a[r * A.s_inner]) * static_cast<acc_t>(b[r * B.s_inner]);
      }
      partial[l] = sum;
    }
  });
  acc_t total = 0;
  for (acc_t value : partial) total += value;
  return total;
}

at::Tensor power_iteration_cpu(const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t dim, int64_t n,
                               double eps, bool v_first) {
  const at::Tensor w3 = as_matrix3d(weight, check_forward_args("sn_ext::power_iteration_", weight, u, v, dim, n, eps));
  at::Tensor sigma = at::empty({}, weight.options().dtype(sigma_dtype(weight.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "power_iteration_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    Vector uu = load_vector<scalar_t>(u), vv = load_vector<scalar_t>(v);
    const acc_t s = power_iterate(Matrix3d<const scalar_t>(w3), uu, vv, n, eps, v_first);
    *sigma.mutable_data_ptr<opmath_t>() = static_cast<opmath_t>(s);
    store_vector<scalar_t>(uu, u);
    store_vector<scalar_t>(vv, v);
  });
  return sigma;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_normalize_cpu(const at::Tensor& weight,
                                                                                  const at::Tensor& u,
                                                                                  const at::Tensor& v, int64_t dim,
                                                                                  int64_t n, double eps, bool v_first) {
  const MatrixShape shape = check_forward_args("sn_ext::spectral_normalize", weight, u, v, dim, n, eps);
  const at::Tensor w3 = as_matrix3d(weight, shape);
  WeightShapedOutput out(weight, shape);
  at::Tensor sigma = at::empty({}, weight.options().dtype(sigma_dtype(weight.scalar_type())));
  at::Tensor u_new = at::empty_like(u, at::MemoryFormat::Contiguous);
  at::Tensor v_new = at::empty_like(v, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "spectral_normalize", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const Matrix3d<const scalar_t> W(w3);
    Vector uu = load_vector<scalar_t>(u), vv = load_vector<scalar_t>(v);
    const opmath_t s = static_cast<opmath_t>(power_iterate(W, uu, vv, n, eps, v_first));
    *sigma.mutable_data_ptr<opmath_t>() = s;
    divide(W, s, Matrix3d<scalar_t>(out.view3d));
    store_vector<scalar_t>(uu, u_new);
    store_vector<scalar_t>(vv, v_new);
  });
  return {out.finish(), sigma, u_new, v_new};
}

at::Tensor spectral_normalize_backward_cpu(const at::Tensor& grad, const at::Tensor& weight_sn, const at::Tensor& u,
                                           const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  const MatrixShape shape =
      check_backward_args("sn_ext::spectral_normalize_backward", grad, weight_sn, u, v, sigma, dim);
  const at::Tensor g3 = as_matrix3d(grad, shape), s3 = as_matrix3d(weight_sn, shape);
  WeightShapedOutput grad_weight(weight_sn, shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight_sn.scalar_type(), "spectral_normalize_backward", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const Matrix3d<const scalar_t> G(g3), S(s3);
        const Matrix3d<scalar_t> out(grad_weight.view3d);
        const opmath_t lambda = static_cast<opmath_t>(inner_product(G, S));
        const opmath_t inv_sigma = opmath_t(1) / sigma.item<opmath_t>();
        const Vector uu = load_vector<scalar_t>(u), vv = load_vector<scalar_t>(v);
        at::parallel_for(0, G.lines(), grain_for(G.inner), [&](int64_t begin, int64_t end) {
          for (int64_t l = begin; l < end; ++l) {
            const int64_t o = l / G.rows, i = l % G.rows;
            const scalar_t* g = G.line(l);
            scalar_t* y = out.line(l);
            const opmath_t lambda_u = lambda * static_cast<opmath_t>(uu[i]);
            const acc_t* vo = vv.data() + o * G.inner;
            for_each_in_line(G.inner, G.s_inner, out.s_inner, [&](int64_t r, int64_t a, int64_t b) {
              const opmath_t corrected = static_cast<opmath_t>(g[a]) - lambda_u * static_cast<opmath_t>(vo[r]);
              y[b] = static_cast<scalar_t>(corrected * inv_sigma);
            });
          }
        });
      });
  return grad_weight.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, CPU, m) {
  m.impl("power_iteration_", &power_iteration_cpu);
  m.impl("spectral_normalize", &spectral_normalize_cpu);
  m.impl("spectral_normalize_backward", &spectral_normalize_backward_cpu);
}

}  // namespace sn_ext
