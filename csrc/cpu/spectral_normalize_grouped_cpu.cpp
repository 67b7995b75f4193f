// The grouped ops on the CPU: the layers one after another through the per-layer CPU kernels (layer_by_layer.h).
// Grouping saves GPU launches; a CPU has none to save, and each layer's kernel is already parallel.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../layer_by_layer.h"
#include "../matrix_view.h"

namespace sn_ext {
namespace {

using Backward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t);

std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
spectral_normalize_grouped_cpu(at::TensorList weights, at::TensorList us, at::TensorList vs, at::IntArrayRef dims,
                               int64_t n, double eps, const LayerOrders& v_first, const LayerCoeffs& coeffs,
                               const LayerGammas& gammas, const LayerSigmaGrads& sigma_grad) {
  return grouped_forward_layer_by_layer(c10::DispatchKey::CPU, weights, us, vs, dims, n, eps, v_first,
                                        {coeffs, gammas, sigma_grad});
}

std::vector<at::Tensor> spectral_normalize_grouped_backward_cpu(at::TensorList grads, at::TensorList weights_sn,
                                                                at::TensorList us, at::TensorList vs,
                                                                const at::Tensor& sigmas, at::IntArrayRef dims) {
  check_grouped_backward_args("sn_ext::spectral_normalize_grouped_backward", grads, weights_sn, us, vs, sigmas, dims);
  static const auto backward =
      c10::Dispatcher::singleton().findSchemaOrThrow("sn_ext::spectral_normalize_backward", "").typed<Backward>();
  std::vector<at::Tensor> grads_weight;
  for (size_t i = 0; i < weights_sn.size(); ++i)
    grads_weight.push_back(backward.redispatch(c10::DispatchKeySet(c10::DispatchKey::CPU), grads[i], weights_sn[i],
                                               us[i], vs[i], sigmas[i], dims[i]));
  return grads_weight;
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, CPU, m) {
  m.impl("spectral_normalize_grouped_", &spectral_normalize_grouped_cpu);
  m.impl("spectral_normalize_grouped_backward", &spectral_normalize_grouped_backward_cpu);
}

}  // namespace sn_ext
