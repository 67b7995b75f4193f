// sn_ext::spectral_normalize_grouped_ and spectral_normalize_grouped_backward on CUDA: a whole group of layers
// in one launch of the forward (spectral_normalize_cuda.cu; the split round: one per power-iteration order) or
// backward kernel (spectral_normalize_backward_cuda.cu), per kGroupLayers layers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../matrix_view.h"
#include "kernels.h"

namespace sn_ext {
namespace {

std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
spectral_normalize_grouped_cuda(at::TensorList weights, at::TensorList us, at::TensorList vs, at::IntArrayRef dims,
                                int64_t n, double eps, const LayerOrders& v_first, const LayerCoeffs& coeffs,
                                const LayerGammas& gammas, const LayerSigmaGrads& sigma_grad) {
  const LayerScalings scalings{coeffs, gammas, sigma_grad};
  const std::vector<MatrixShape> shapes = check_grouped_forward_args("sn_ext::spectral_normalize_grouped_", weights, us,
                                                                     vs, dims, n, eps, v_first, scalings);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  std::vector<WeightShapedOutput> outs;
  std::vector<at::Tensor> us_used, vs_used;
  // Each layer runs its own power-iteration order, with the same bits as in a launch of its own: the fused round's
  // layers of both orders share a launch, the split round's take one per order (run_forward).
  std::vector<ForwardLayer> layers;
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t groups = forward_column_groups(weights[i], dims[i]);
    outs.emplace_back(weights[i], shapes[i], groups);
    us_used.push_back(at::empty_like(us[i], at::MemoryFormat::Contiguous));
    vs_used.push_back(at::empty_like(vs[i], at::MemoryFormat::Contiguous));
    // n == 0 reads and returns the buffers and changes nothing; otherwise the result goes to both.
    layers.push_back({as_matrix3d(weights[i], shapes[i], groups), outs[i].view3d, us[i], vs[i], us_used[i], vs_used[i],
                      n == 0 ? Finish::kRestore : Finish::kBoth, layer_v_first(v_first, i), groups, scalings.of(i)});
  }
  at::Tensor sigmas = at::empty({static_cast<int64_t>(weights.size())},
                                weights[0].options().dtype(sigma_dtype(weights[0].scalar_type())));
  run_forward(layers, sigmas, n, eps);
  std::vector<at::Tensor> weights_sn;
  for (auto& out : outs) weights_sn.push_back(out.finish());
  return {weights_sn, sigmas, us_used, vs_used};
}

std::vector<at::Tensor> spectral_normalize_grouped_backward_cuda(at::TensorList grads, at::TensorList weights_sn,
                                                                 at::TensorList us, at::TensorList vs,
                                                                 const at::Tensor& sigmas, at::IntArrayRef dims) {
  const std::vector<MatrixShape> shapes = check_grouped_backward_args("sn_ext::spectral_normalize_grouped_backward",
                                                                      grads, weights_sn, us, vs, sigmas, dims);
  const c10::cuda::CUDAGuard guard(weights_sn[0].device());
  std::vector<WeightShapedOutput> outs;
  std::vector<BackwardLayer> layers;
  for (size_t i = 0; i < weights_sn.size(); ++i) {
    const int64_t groups = memory_column_groups(weights_sn[i], dims[i]);
    outs.emplace_back(weights_sn[i], shapes[i], groups);
    layers.push_back({as_matrix3d(grads[i], shapes[i], groups), as_matrix3d(weights_sn[i], shapes[i], groups),
                      outs[i].view3d, us[i], vs[i], groups});
  }
  run_backward(layers, sigmas.contiguous());
  std::vector<at::Tensor> grads_weight;
  for (auto& out : outs) grads_weight.push_back(out.finish());
  return grads_weight;
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, CUDA, m) {
  m.impl("spectral_normalize_grouped_", &spectral_normalize_grouped_cuda);
  m.impl("spectral_normalize_grouped_backward", &spectral_normalize_grouped_backward_cuda);
}

}  // namespace sn_ext
