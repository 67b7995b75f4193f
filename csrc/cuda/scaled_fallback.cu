// The scaled forms (bounded spectral norm, sigma-reparam: docs/variants.md) on CUDA weights, until the CUDA kernels
// take them: host code only, so that the kernels stay as they are. Correct, and slower than the fused kernels by a
// few launches: the forward runs its rounds in the CUDA forward kernel (sn_ext::power_iteration_ on copies of u and
// v, which are then committed) and W g / max(sigma, f) as one ATen multiply; the backward is ATen ops (the reference's
// formula). Every scalar stays on the device: no host synchronization, and gamma is never read on the host.
//
// What the kernels need to take these over (docs/variants.md, "CUDA"): the forward's division pass multiplies by
// s = g / max(sigma, f) instead of dividing by sigma (two more scalars per layer: coeff, and a pointer to gamma);
// the backward reads W where it reads W_sn, and its correction uses lambda' = k <G, W> / max(sigma, f) and s where
// it uses <G, W_sn> and 1 / sigma, writing mu c as gamma's gradient.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "scaled_fallback.h"

namespace sn_ext {
namespace {

// g / max(sigma, f) as a 0-d tensor of sigma's dtype on the device.
at::Tensor scale_of(const at::Tensor& sigma, const at::Tensor& divisor, const Scaling& scaling) {
  const double c = scaling.coeff_or_one();
  if (scaling.gamma.has_value()) return scaling.gamma->to(sigma.scalar_type()).reshape({}).mul(c).div(divisor);
  return divisor.reciprocal().mul(c);
}

at::Tensor divisor_of(const at::Tensor& sigma, const Scaling& scaling) {
  return scaling.coeff.has_value() ? at::clamp_min(sigma, *scaling.coeff) : sigma;
}

using PowerIteration = at::Tensor(const at::Tensor&, at::Tensor&, at::Tensor&, int64_t, int64_t, double, bool);

std::tuple<at::Tensor, at::Tensor> spectral_normalize_scaled_backward_cuda(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma,
    int64_t dim, std::optional<double> coeff, const std::optional<at::Tensor>& gamma, bool sigma_grad) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const Scaling scaling{coeff, gamma};
  check_scaled_backward_args("sn_ext::spectral_normalize_scaled_backward", grad, weight, u, v, sigma, dim, scaling);
  const at::ScalarType acc = sigma_dtype(weight.scalar_type());
  const at::Tensor sig = sigma.to(weight.options().dtype(acc)).reshape({});
  const at::Tensor divisor = divisor_of(sig, scaling);
  const at::Tensor g = grad.to(acc);
  const at::Tensor mu = at::sum(g * weight.to(acc)).div(divisor);
  at::Tensor correction = at::zeros_like(mu);
  if (sigma_grad) correction = coeff.has_value() ? at::where(sig > *coeff, mu, correction) : mu;
  const int64_t d = dim < 0 ? dim + weight.dim() : dim;
  at::Tensor grad_weight = at::empty_like(weight);
  grad_weight.copy_((g - correction * rank_one(u.to(acc), v.to(acc), weight, d)).mul(scale_of(sig, divisor, scaling)));
  at::Tensor grad_gamma = mu.mul(scaling.coeff_or_one());
  if (gamma.has_value()) grad_gamma = grad_gamma.to(gamma->scalar_type()).reshape(gamma->sizes()).contiguous();
  return {grad_weight, grad_gamma};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scaled_forward_cuda(const at::Tensor& weight, at::Tensor& u,
                                                                               at::Tensor& v, int64_t dim, int64_t n,
                                                                               double eps, bool v_first,
                                                                               const Scaling& scaling) {
  static const auto power_iteration =
      c10::Dispatcher::singleton().findSchemaOrThrow("sn_ext::power_iteration_", "").typed<PowerIteration>();
  const c10::cuda::CUDAGuard guard(weight.device());
  constexpr const char* op = "sn_ext::spectral_normalize_";
  check_forward_args(op, weight, u, v, dim, n, eps);
  check_scaling(op, weight, scaling);
  // The rounds on copies, which keep the inputs where a round was degenerate (power_iteration_ commits only usable
  // rounds), then into u and v: the vectors used are fresh tensors and the buffers hold them, as the fused forward's.
  at::Tensor u_used = at::empty_like(u, at::MemoryFormat::Contiguous).copy_(u);
  at::Tensor v_used = at::empty_like(v, at::MemoryFormat::Contiguous).copy_(v);
  const at::Tensor sigma = power_iteration.redispatch(c10::DispatchKeySet(c10::DispatchKey::CUDA), weight, u_used,
                                                      v_used, dim, n, eps, v_first);
  if (n > 0) {
    u.copy_(u_used);
    v.copy_(v_used);
  }
  at::Tensor weight_sn = at::empty_like(weight);
  at::mul_out(weight_sn, weight, scale_of(sigma, divisor_of(sigma, scaling), scaling));
  return {weight_sn, sigma, u_used, v_used};
}

TORCH_LIBRARY_IMPL(sn_ext, CUDA, m) {
  m.impl("spectral_normalize_scaled_backward", &spectral_normalize_scaled_backward_cuda);
}

}  // namespace sn_ext
