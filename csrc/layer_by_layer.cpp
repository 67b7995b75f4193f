#include "layer_by_layer.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

namespace sn_ext {

std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
grouped_forward_layer_by_layer(c10::DispatchKey key, at::TensorList weights, at::TensorList us, at::TensorList vs,
                               at::IntArrayRef dims, int64_t n, double eps, const LayerOrders& v_first,
                               const LayerScalings& scalings) {
  using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, at::Tensor&, at::Tensor&, int64_t, int64_t, double, bool, std::optional<double>,
      const std::optional<at::Tensor>&, bool);
  static const auto forward =
      c10::Dispatcher::singleton().findSchemaOrThrow("sn_ext::spectral_normalize_", "").typed<Forward>();
  check_grouped_forward_args("sn_ext::spectral_normalize_grouped_", weights, us, vs, dims, n, eps, v_first, scalings);
  std::vector<at::Tensor> weights_sn, sigmas, us_used, vs_used;
  for (size_t i = 0; i < weights.size(); ++i) {
    at::Tensor u = us[i], v = vs[i];  // handles on the caller's buffers, which the op updates in place
    const Scaling scaling = scalings.of(i);
    auto [weight_sn, sigma, u_used, v_used] =
        forward.redispatch(c10::DispatchKeySet(key), weights[i], u, v, dims[i], n, eps, layer_v_first(v_first, i),
                           scaling.coeff, scaling.gamma, scalings.layer_sigma_grad(i));
    weights_sn.push_back(weight_sn);
    sigmas.push_back(sigma);
    us_used.push_back(u_used);
    vs_used.push_back(v_used);
  }
  return {weights_sn, at::stack(sigmas), us_used, vs_used};
}

}  // namespace sn_ext
