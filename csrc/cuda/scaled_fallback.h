// The scaled forms (bounded spectral norm, sigma-reparam: docs/variants.md) on CUDA weights, until the CUDA kernels
// take them (scaled_fallback.cu): the ops' CUDA kernels hand a scaled call here.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "../matrix_view.h"

namespace sn_ext {

// sn_ext::spectral_normalize_ with coeff or gamma, its arguments checked.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scaled_forward_cuda(const at::Tensor& weight, at::Tensor& u,
                                                                               at::Tensor& v, int64_t dim, int64_t n,
                                                                               double eps, bool v_first,
                                                                               const Scaling& scaling);

}  // namespace sn_ext
