// The sn_ext operator schemas: defined once here; kernels register per dispatch key in cpu/ and cuda/.
// sn_ext/_schemas.py holds the same strings for the pure-PyTorch fallback (tests/test_schemas.py keeps them equal).
#include <torch/library.h>

TORCH_LIBRARY(sn_ext, m) {
  // n rounds of power iteration on W's matrix view for `dim`, updating u and v in place.
  // Returns sigma = u^T W v for the updated vectors.
  m.def(
      "power_iteration_(Tensor weight, Tensor(a!) u, Tensor(b!) v, int dim, int n_power_iterations, "
      "float eps, bool v_first=False) -> Tensor");
  // Fused forward of one layer: n rounds of power iteration from (u, v), sigma, and weight / sigma, in one call
  // (one launch on a GPU). u and v are updated in place (not when n == 0, or when a round was degenerate), and the
  // vectors sigma was computed with are also returned as fresh tensors for autograd to save, so that a second call
  // before the first one's backward may overwrite u and v.
  // The scaled forms (docs/variants.md) replace weight / sigma by weight * g / max(sigma, f) in the same pass:
  // coeff = c bounds the norm (g = f = c: weight / max(1, sigma / c)), gamma (a one-element tensor, read where the
  // kernels run) scales it (g = gamma, sigma-reparam), both multiply (g = gamma c, f = c). sigma_grad=False stops
  // the gradient through sigma (autograd's concern only: the forward computes the same).
  m.def(
      "spectral_normalize_(Tensor weight, Tensor(a!) u, Tensor(b!) v, int dim, int n_power_iterations, float eps, "
      "bool v_first=False, float? coeff=None, Tensor? gamma=None, bool sigma_grad=True) "
      "-> (Tensor weight_sn, Tensor sigma, Tensor u_used, Tensor v_used)");
  // Backward of weight -> weight / (u^T W v): (grad - <grad, weight_sn> u v^T) / sigma.
  m.def(
      "spectral_normalize_backward(Tensor grad, Tensor weight_sn, Tensor u, Tensor v, Tensor sigma, int dim) "
      "-> Tensor");
  // Backward of the scaled forms, from the weight itself (not the output: gamma's gradient must survive gamma = 0),
  // in one pass as spectral_normalize_backward: with mu = <grad, weight> / max(sigma, f) and s = g / max(sigma, f),
  // grad_weight = s (grad - k mu u v^T), k = 1 while sigma > f and sigma_grad, else 0; grad_gamma = mu c (c = coeff,
  // or 1), in gamma's dtype and shape (without gamma: the derivative at gamma = 1, in sigma's dtype).
  m.def(
      "spectral_normalize_scaled_backward(Tensor grad, Tensor weight, Tensor u, Tensor v, Tensor sigma, int dim, "
      "float? coeff=None, Tensor? gamma=None, bool sigma_grad=True) -> (Tensor grad_weight, Tensor grad_gamma)");
  // Grouped mode (sn_ext.grouped_spectral_norm): the forward of many layers in one call (one launch on a GPU per
  // power-iteration order). Each layer as spectral_normalize_ with its own v_first (None: every layer u-first),
  // coeff, gamma and sigma_grad (None: none for any layer), us and vs updated in place and the vectors used returned
  // as spectral_normalize_ does. sigmas holds one value per layer. All weights share one dtype and device.
  m.def(
      "spectral_normalize_grouped_(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int[] dims, "
      "int n_power_iterations, float eps, bool[]? v_first=None, float[]? coeffs=None, Tensor[]? gammas=None, "
      "bool[]? sigma_grad=None) -> (Tensor[] weights_sn, Tensor sigmas, Tensor[] us_used, Tensor[] vs_used)");
  // Its backward, every layer in one call: grads[i] -> (grads[i] - <grads[i], weights_sn[i]> u_i v_i^T) / sigma_i.
  m.def(
      "spectral_normalize_grouped_backward(Tensor[] grads, Tensor[] weights_sn, Tensor[] us, Tensor[] vs, "
      "Tensor sigmas, int[] dims) -> Tensor[]");
}
