// The grouped ops on the CPU: the layers one after another through the per-layer CPU kernels. Grouping saves GPU
// launches; a CPU has none to save, and each layer's kernel is already parallel.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../matrix_view.h"

namespace sn_ext {
namespace {

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, at::Tensor&, at::Tensor&,
                                                                           int64_t, int64_t, double, bool,
                                                                           std::optional<double>,
                                                                           const std::optional<at::Tensor>&, bool);
using Backward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t);

const c10::DispatchKeySet kCpu(c10::DispatchKey::CPU);

std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
spectral_normalize_grouped_cpu(at::TensorList weights, at::TensorList us, at::TensorList vs, at::IntArrayRef dims,
                               int64_t n, double eps, const LayerOrders& v_first, const LayerCoeffs& coeffs,
                               const LayerGammas& gammas, const LayerSigmaGrads& sigma_grad) {
  const LayerScalings scalings{coeffs, gammas, sigma_grad};
  check_grouped_forward_args("sn_ext::spectral_normalize_grouped_", weights, us, vs, dims, n, eps, v_first, scalings);
  static const auto forward =
      c10::Dispatcher::singleton().findSchemaOrThrow("sn_ext::spectral_normalize_", "").typed<Forward>();
  std::vector<at::Tensor> weights_sn, sigmas, us_used, vs_used;
  for (size_t i = 0; i < weights.size(); ++i) {
    at::Tensor u = us[i], v = vs[i];  // handles on the caller's buffers, which the op updates in place
    const Scaling scaling = scalings.of(i);
    auto [weight_sn, sigma, u_used, v_used] =
        forward.redispatch(kCpu, weights[i], u, v, dims[i], n, eps, layer_v_first(v_first, i), scaling.coeff,
                           scaling.gamma, scalings.layer_sigma_grad(i));
    weights_sn.push_back(weight_sn);
    sigmas.push_back(sigma);
    us_used.push_back(u_used);
    vs_used.push_back(v_used);
  }
  return {weights_sn, at::stack(sigmas), us_used, vs_used};
}

std::vector<at::Tensor> spectral_normalize_grouped_backward_cpu(at::TensorList grads, at::TensorList weights_sn,
                                                                at::TensorList us, at::TensorList vs,
                                                                const at::Tensor& sigmas, at::IntArrayRef dims) {
  check_grouped_backward_args("sn_ext::spectral_normalize_grouped_backward", grads, weights_sn, us, vs, sigmas, dims);
  static const auto backward =
      c10::Dispatcher::singleton().findSchemaOrThrow("sn_ext::spectral_normalize_backward", "").typed<Backward>();
  std::vector<at::Tensor> grads_weight;
  for (size_t i = 0; i < weights_sn.size(); ++i)
    grads_weight.push_back(backward.redispatch(kCpu, grads[i], weights_sn[i], us[i], vs[i], sigmas[i], dims[i]));
  return grads_weight;
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, CPU, m) {
  m.impl("spectral_normalize_grouped_", &spectral_normalize_grouped_cpu);
  m.impl("spectral_normalize_grouped_backward", &spectral_normalize_grouped_backward_cpu);
}

}  // namespace sn_ext
