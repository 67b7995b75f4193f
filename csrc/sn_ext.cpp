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
  m.def(
      "spectral_normalize_(Tensor weight, Tensor(a!) u, Tensor(b!) v, int dim, int n_power_iterations, float eps, "
      "bool v_first=False) -> (Tensor weight_sn, Tensor sigma, Tensor u_used, Tensor v_used)");
  // Backward of weight -> weight / (u^T W v): (grad - <grad, weight_sn> u v^T) / sigma.
  m.def(
      "spectral_normalize_backward(Tensor grad, Tensor weight_sn, Tensor u, Tensor v, Tensor sigma, int dim) "
      "-> Tensor");
  // Grouped mode (sn_ext.grouped_spectral_norm): the forward of many layers in one call (one launch on a GPU per
  // power-iteration order). Each layer as spectral_normalize_ with its own v_first (None: every layer u-first),
  // us and vs updated in place and the vectors used returned as spectral_normalize_ does. sigmas holds one value
  // per layer. All weights share one dtype and device.
  m.def(
      "spectral_normalize_grouped_(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int[] dims, "
      "int n_power_iterations, float eps, bool[]? v_first=None) -> (Tensor[] weights_sn, Tensor sigmas, "
      "Tensor[] us_used, Tensor[] vs_used)");
  // Its backward, every layer in one call: grads[i] -> (grads[i] - <grads[i], weights_sn[i]> u_i v_i^T) / sigma_i.
  m.def(
      "spectral_normalize_grouped_backward(Tensor[] grads, Tensor[] weights_sn, Tensor[] us, Tensor[] vs, "
      "Tensor sigmas, int[] dims) -> Tensor[]");
}
