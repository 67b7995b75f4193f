// The grouped forward as the per-layer forward op, layer after layer: the CPU's grouped op (a CPU has no launches to
// save, and each layer's kernel is already parallel).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DispatchKey.h>

#include <tuple>
#include <vector>

#include "matrix_view.h"

namespace sn_ext {

// sn_ext::spectral_normalize_grouped_ through sn_ext::spectral_normalize_'s kernel for `key`, its arguments checked
// first.
std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
grouped_forward_layer_by_layer(c10::DispatchKey key, at::TensorList weights, at::TensorList us, at::TensorList vs,
                               at::IntArrayRef dims, int64_t n, double eps, const LayerOrders& v_first,
                               const LayerScalings& scalings);

}  // namespace sn_ext
