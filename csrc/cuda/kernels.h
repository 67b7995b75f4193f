// The two CUDA kernels as the op files see them (host code only): run_forward, the forward kernel of
// spectral_normalize_cuda.cu, serves spectral_normalize_, power_iteration_ and spectral_normalize_grouped_;
// run_backward, the backward kernel of spectral_normalize_backward_cuda.cu, serves spectral_normalize_backward and
// spectral_normalize_grouped_backward. Each runs a list of layers (one dtype and device): one layer in one launch, a
// group in one launch per kGroupLayers layers (common.cuh; or one per phase, phased: launch.h).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../matrix_view.h"

namespace sn_ext {

// What the last half-step does with the vectors once it knows whether any round was degenerate.
enum class Finish : int {
  kNone,     // not the last half-step
  kRestore,  // n == 0: the work vectors are the outputs u_used, v_used; on failure they get the inputs
  kCommit,   // power_iteration_: on success the work vectors are copied into the caller's u, v
  kBoth,     // spectral_normalize_ and the grouped forward: kRestore on failure, kCommit on success (outputs and
             // buffers both hold the result)
};

// One layer of a forward launch, as tensors. u_in, v_in: the vectors to start from; u_work, v_work: where the
// rounds write theirs (contiguous); `finish` says whether they are the outputs, scratch to commit into u_in, v_in,
// or both. `out`: W_sn's (outer, rows, inner) view, undefined for no division. v_first: the layer's power-iteration
// order. column_groups: 0, or w3 and out3 are the matrices of a channels_last weight's memory order (as_matrix3d's
// column_groups: I; the fused round only, forward_column_groups). scaling: a scaled form's out3 is W g / max(sigma, f)
// (scaled_form.cuh), computed in the same pass.
struct ForwardLayer {
  at::Tensor w3, out3, u_in, v_in, u_work, v_work;
  Finish finish;
  bool v_first = false;
  int64_t column_groups = 0;
  Scaling scaling = {};
};

// The column order the forward reads `weight` (seen through `dim`) in: memory_column_groups under the fused round,
// which reads a channels_last convolution weight in place; 0 (torch's order, copied) under the split rounds.
int64_t forward_column_groups(const at::Tensor& weight, int64_t dim);

// Runs the forward of `layers` (one dtype and device): n rounds, then W / sigma; sigma[i] (a contiguous tensor
// of one value per layer, of any shape) for layer i. The fused round runs layers of both orders in one launch (per
// kGroupLayers layers), the split round one order per launch.
void run_forward(const std::vector<ForwardLayer>& layers, const at::Tensor& sigmas, int64_t n, double eps);

// One layer of a backward launch: grad_W = (G - <G, W_sn> u v^T) / sigma, written through out3. column_groups: as
// ForwardLayer's (memory_column_groups of W_sn: every weight-shaped view in that order).
struct BackwardLayer {
  at::Tensor g3, s3, out3, u, v;
  int64_t column_groups = 0;
};

// The scaled backward of one layer (spectral_normalize_scaled_backward): its BackwardLayer's s3 is W itself,
// grad_W = s (G - k mu u v^T) with mu = <G, W> / max(sigma, f), and grad_gamma (one element) gets mu c.
struct ScaledBackwardArgs {
  Scaling scaling;
  bool sigma_grad;
  at::Tensor grad_gamma;
};

// grad_W of every layer, with sigma[i] (a contiguous tensor of one op-math value per layer) for layer i; `scaled`:
// the scaled backward of a single layer.
void run_backward(const std::vector<BackwardLayer>& layers, const at::Tensor& sigmas,
                  const ScaledBackwardArgs* scaled = nullptr);

}  // namespace sn_ext
