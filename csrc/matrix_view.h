// How a weight of any rank is seen as the (h x w) matrix that spectral norm normalizes, without a copy.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace sn_ext {

// torch's matrix view is W.permute(dim, *other dims).flatten(1), which copies when dim != 0.
// The same matrix is W viewed as a 3-D tensor (outer, rows, inner), where outer = prod(sizes[:dim]) and
// inner = prod(sizes[dim+1:]):  Wm[i, o * inner + r] = W3[o][i][r].  Kernels index through W3's strides.
struct MatrixShape {
  int64_t outer;
  int64_t rows;
  int64_t inner;
  int64_t cols() const { return outer * inner; }
};

// Wraps a negative dim and checks its range; `op` names the operator in error messages.
int64_t wrap_dim(const char* op, const at::Tensor& weight, int64_t dim);
MatrixShape matrix_shape(const at::Tensor& weight, int64_t dim);
// W as (outer, rows, inner): a view for every weight whose layout allows it (all contiguous ones).
at::Tensor as_matrix3d(const at::Tensor& tensor, const MatrixShape& shape);

// A weight seen through dim 0 whose memory holds dim 1 innermost, as a channels_last convolution weight ((O, kh, kw, I)
// in memory), has contiguous rows that hold their columns in another order: torch's column c = i * S + s at memory
// column s * I + i (S: the other dims' product). memory_column_groups returns I for such a weight, 0 for any other
// (contiguous ones, where the orders agree, included); as_matrix3d with column_groups > 0 gives the (1, rows, cols)
// matrix of that memory order (a view of a tensor in that layout, else a copy), which the CUDA kernels read in place
// (block_walk::ColumnOrder finds v's element of each column).
int64_t memory_column_groups(const at::Tensor& weight, int64_t dim);
at::Tensor as_matrix3d(const at::Tensor& tensor, const MatrixShape& shape, int64_t column_groups);

// Errors that name the argument, raised before any state changes.
void check_weight(const char* op, const at::Tensor& weight);
void check_vectors(const char* op, const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                   const MatrixShape& shape);
void check_iterations(const char* op, int64_t n_power_iterations, double eps);

// All the checks of a forward op (spectral_normalize_, power_iteration_); returns the weight's matrix shape.
MatrixShape check_forward_args(const char* op, const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                               int64_t dim, int64_t n_power_iterations, double eps);
// All the checks of spectral_normalize_backward; returns the matrix shape.
MatrixShape check_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& weight_sn,
                                const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma, int64_t dim);

// The scaled forms of the forward (bounded spectral norm, sigma-reparam: docs/variants.md), W_hat = W s with
// s = g / max(sigma, f): coeff = c gives g = f = c, gamma multiplies g (the kernels read it where they run).
struct Scaling {
  std::optional<double> coeff;
  std::optional<at::Tensor> gamma;
  bool scaled() const { return coeff.has_value() || gamma.has_value(); }
  // max(sigma, coeff) (a NaN sigma stays NaN), or sigma without a coeff.
  double divisor(double sigma) const { return coeff.has_value() && sigma < *coeff ? *coeff : sigma; }
  // g without gamma's factor: coeff, or 1.
  double coeff_or_one() const { return coeff.value_or(1.0); }
  // Whether the backward's correction counts: sigma_grad and, with a coeff, sigma > coeff.
  bool counts(double sigma, bool sigma_grad) const { return sigma_grad && (!coeff.has_value() || sigma > *coeff); }
};

// coeff a positive finite number, gamma a one-element float tensor on the weight's device.
void check_scaling(const char* op, const at::Tensor& weight, const Scaling& scaling);
// All the checks of spectral_normalize_scaled_backward (spectral_normalize_backward's on the weight, and
// check_scaling's); returns the matrix shape.
MatrixShape check_scaled_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& weight,
                                       const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma, int64_t dim,
                                       const Scaling& scaling);

// The grouped forward's power-iteration order of each layer (its `bool[]? v_first`): none means every layer
// u-first.
using LayerOrders = std::optional<c10::List<bool>>;
inline bool layer_v_first(const LayerOrders& v_first, size_t layer) {
  return v_first.has_value() && v_first->get(layer);
}

// The checks of the grouped ops: lists of one length (v_first too, when given), one dtype and one device for every
// tensor, and each layer's own checks (their errors name the layer: "sn_ext::spectral_normalize_grouped_ (layer 2):
// u must ..."). Returns the layers' matrix shapes.
// The grouped forward's per-layer scaled forms (its coeffs, gammas and sigma_grad; none: no layer scaled).
using LayerCoeffs = std::optional<at::ArrayRef<double>>;
using LayerGammas = std::optional<at::TensorList>;
using LayerSigmaGrads = std::optional<c10::List<bool>>;
struct LayerScalings {
  const LayerCoeffs& coeffs;
  const LayerGammas& gammas;
  const LayerSigmaGrads& sigma_grad;
  Scaling of(size_t layer) const {
    return {coeffs.has_value() ? std::optional<double>((*coeffs)[layer]) : std::nullopt,
            gammas.has_value() ? std::optional<at::Tensor>((*gammas)[layer]) : std::nullopt};
  }
  bool layer_sigma_grad(size_t layer) const { return !sigma_grad.has_value() || sigma_grad->get(layer); }
};

std::vector<MatrixShape> check_grouped_forward_args(const char* op, at::TensorList weights, at::TensorList us,
                                                    at::TensorList vs, at::IntArrayRef dims, int64_t n_power_iterations,
                                                    double eps, const LayerOrders& v_first,
                                                    const LayerScalings& scalings);
std::vector<MatrixShape> check_grouped_backward_args(const char* op, at::TensorList grads, at::TensorList weights_sn,
                                                     at::TensorList us, at::TensorList vs, const at::Tensor& sigmas,
                                                     at::IntArrayRef dims);

// A new tensor in `like`'s layout (as torch's `weight / sigma` and the fake kernels give) and the (outer, rows,
// inner) view kernels write through (column_groups > 0: the matrix of its memory order, as_matrix3d). A layout with
// no such view (channels_last with dim=0, in torch's column order) gets a contiguous scratch view instead, which
// finish() copies back.
struct WeightShapedOutput {
  at::Tensor tensor;
  at::Tensor view3d;
  WeightShapedOutput(const at::Tensor& like, const MatrixShape& shape, int64_t column_groups = 0);
  at::Tensor finish();
};

// sigma's dtype: float32 for float16/bfloat16/float32 weights, float64 for float64.
at::ScalarType sigma_dtype(at::ScalarType weight_dtype);

// torch's matrix view of a weight-shaped tensor, as ATen ops (a copy when dim != 0; autograd's double backward uses
// it, never the kernels).
at::Tensor to_matrix(const at::Tensor& t, int64_t dim);
// u v^T in the layout of `like` (a view of the outer product): the gradient of sigma = u^T W v.
at::Tensor rank_one(const at::Tensor& u, const at::Tensor& v, const at::Tensor& like, int64_t dim);

}  // namespace sn_ext
