// The scaled forms (bounded spectral norm, sigma-reparam: docs/variants.md) inside the CUDA kernels: W_sn =
// W g / max(sigma, f), with g = c gamma and f = c (c: the coeff, or 1 and f = 0 without one; gamma: a one-element
// device tensor, or 1). Where the plain form divides by sigma, a scaled layer divides by max(sigma, f) / g: the
// forward's last pass and the backward's correction are the same passes with another divisor, and the backward's
// sum reads W where the plain form's reads W_sn (spectral_normalize_scaled_backward's formula, ops.py).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../matrix_view.h"

namespace sn_ext {
namespace {

// A one-element float tensor's value (any float dtype), read on the device: gamma is never read on the host, which
// would synchronize.
template <typename acc_t>
__device__ __forceinline__ acc_t load_scalar(const void* p, c10::ScalarType type) {
  switch (type) {
    case c10::ScalarType::Double:
      return static_cast<acc_t>(*static_cast<const double*>(p));
    case c10::ScalarType::Half:
      return static_cast<acc_t>(static_cast<float>(*static_cast<const c10::Half*>(p)));
    case c10::ScalarType::BFloat16:
      return static_cast<acc_t>(static_cast<float>(*static_cast<const c10::BFloat16*>(p)));
    default:
      return static_cast<acc_t>(*static_cast<const float*>(p));
  }
}

template <typename acc_t>
__device__ __forceinline__ void store_scalar(void* p, c10::ScalarType type, acc_t value) {
  switch (type) {
    case c10::ScalarType::Double:
      *static_cast<double*>(p) = static_cast<double>(value);
      break;
    case c10::ScalarType::Half:
      *static_cast<c10::Half*>(p) = c10::Half(static_cast<float>(value));
      break;
    case c10::ScalarType::BFloat16:
      *static_cast<c10::BFloat16*>(p) = c10::BFloat16(static_cast<float>(value));
      break;
    default:
      *static_cast<float*>(p) = static_cast<float>(value);
  }
}

// A layer's scaled form as the kernels see it (the plain form: no coeff, no gamma).
template <typename acc_t>
struct ScaledForm {
  const void* gamma;  // nullptr: none
  acc_t coeff;        // c; 0: none (checked positive on the host)
  c10::ScalarType gamma_type;

  __device__ bool scaled() const { return coeff > 0 || gamma != nullptr; }
  // max(sigma, f) (a NaN sigma stays NaN, as Scaling::divisor).
  __device__ acc_t clamped(acc_t sigma) const { return coeff > 0 && sigma < coeff ? coeff : sigma; }
  __device__ acc_t coeff_or_one() const { return coeff > 0 ? coeff : acc_t(1); }
  // What W and the backward's correction are divided by: sigma, or max(sigma, f) / g.
  __device__ acc_t output_divisor(acc_t sigma) const {
    if (!scaled()) return sigma;
    const acc_t g = gamma != nullptr ? coeff_or_one() * load_scalar<acc_t>(gamma, gamma_type) : coeff_or_one();
    return clamped(sigma) / g;
  }
};

template <typename acc_t>
ScaledForm<acc_t> scaled_form_of(const Scaling& scaling) {
  return {scaling.gamma.has_value() ? scaling.gamma->const_data_ptr() : nullptr,
          static_cast<acc_t>(scaling.coeff.value_or(0.0)),
          scaling.gamma.has_value() ? scaling.gamma->scalar_type() : c10::ScalarType::Float};
}

// The scaled backward's terms of one launch (a per-layer op: one layer), beside the layer's ScaledForm.
template <typename acc_t>
struct ScaledBackward {
  ScaledForm<acc_t> form;
  bool sigma_grad;
  void* grad_gamma;  // nullptr: the plain backward
  c10::ScalarType grad_gamma_type;
};

// lambda and the divisor of the correction (G - lambda u v^T) / divisor from the layer's sum: <G, W_sn> and sigma
// (plain), or k mu and max(sigma, f) / g with mu = <G, W> / max(sigma, f) (k: sigma_grad and, with a coeff,
// sigma > coeff); the scaled form's block 0 writes gamma's gradient, mu c.
template <typename acc_t>
struct CorrectionTerms {
  acc_t lambda, divisor;
};

template <typename acc_t>
__device__ __forceinline__ CorrectionTerms<acc_t> correction_terms(const ScaledBackward<acc_t>& s, acc_t sum,
                                                                   acc_t sigma, bool writes_grad_gamma) {
  if (s.grad_gamma == nullptr) return {sum, sigma};
  const acc_t mu = sum / s.form.clamped(sigma);
  if (writes_grad_gamma) store_scalar(s.grad_gamma, s.grad_gamma_type, mu * s.form.coeff_or_one());
  const bool counts = s.sigma_grad && (!(s.form.coeff > 0) || sigma > s.form.coeff);
  return {counts ? mu : acc_t(0), s.form.output_divisor(sigma)};
}

}  // namespace
}  // namespace sn_ext
