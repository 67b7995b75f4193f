#include "matrix_view.h"

#include <limits>
#include <string>
#include <utility>

namespace sn_ext {

int64_t wrap_dim(const char* op, const at::Tensor& weight, int64_t dim) {
  const int64_t ndim = weight.dim();
  TORCH_CHECK_INDEX(dim >= -ndim && dim < ndim, op, ": dim out of range (expected to be in range of [", -ndim, ", ",
                    ndim - 1, "] but got ", dim, ")");
  return dim < 0 ? dim + ndim : dim;
}

MatrixShape matrix_shape(const at::Tensor& weight, int64_t dim) {
  MatrixShape shape{1, weight.size(dim), 1};
  for (int64_t d = 0; d < dim; ++d) shape.outer *= weight.size(d);
  for (int64_t d = dim + 1; d < weight.dim(); ++d) shape.inner *= weight.size(d);
  return shape;
}

at::Tensor as_matrix3d(const at::Tensor& tensor, const MatrixShape& shape) {
  return tensor.reshape({shape.outer, shape.rows, shape.inner});
}

namespace {

// The dims in memory_column_groups' memory order: 0, 2, ..., dim() - 1, 1.
std::vector<int64_t> dim1_last(const at::Tensor& tensor) {
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < tensor.dim(); ++d) order.push_back(d);
  order.push_back(1);
  return order;
}

}  // namespace

int64_t memory_column_groups(const at::Tensor& weight, int64_t dim) {
  if (dim < 0) dim += weight.dim();  // checked already (check_forward_args)
  if (dim != 0 || weight.dim() < 3 || weight.is_contiguous()) return 0;
  const int64_t groups = weight.size(1), cols = weight.numel() / weight.size(0);
  // One group or one column per group: the orders agree. Columns past int32: the kernels' column maps are 32-bit.
  if (groups == 1 || groups == cols || cols > std::numeric_limits<int32_t>::max()) return 0;
  return weight.permute(dim1_last(weight)).is_contiguous() ? groups : 0;
}

at::Tensor as_matrix3d(const at::Tensor& tensor, const MatrixShape& shape, int64_t column_groups) {
  if (column_groups == 0) return as_matrix3d(tensor, shape);
  return tensor.permute(dim1_last(tensor)).reshape({1, shape.rows, shape.cols()});
}

void check_weight(const char* op, const at::Tensor& weight) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": weight must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(weight.dim() >= 1, op, ": weight must have at least 1 dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(weight.numel() > 0, op, ": weight must not be empty, got shape ", weight.sizes());
}

void check_vectors(const char* op, const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                   const MatrixShape& shape) {
  for (const auto& [name, vec, size] : {std::tuple<const char*, const at::Tensor&, int64_t>{"u", u, shape.rows},
                                        std::tuple<const char*, const at::Tensor&, int64_t>{"v", v, shape.cols()}}) {
    TORCH_CHECK_VALUE(vec.dim() == 1 && vec.size(0) == size, op, ": ", name, " must be a vector of size ", size,
                      " for a weight of shape ", weight.sizes(), ", got shape ", vec.sizes());
    TORCH_CHECK_TYPE(vec.scalar_type() == weight.scalar_type(), op, ": ", name, " must have the weight's dtype ",
                     weight.scalar_type(), ", got ", vec.scalar_type());
    TORCH_CHECK(vec.device() == weight.device(), op, ": ", name, " must be on the weight's device ", weight.device(),
                ", got ", vec.device());
  }
}

void check_iterations(const char* op, int64_t n_power_iterations, double eps) {
  TORCH_CHECK_VALUE(n_power_iterations >= 0, op, ": n_power_iterations must be >= 0, got ", n_power_iterations);
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);
}

MatrixShape check_forward_args(const char* op, const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                               int64_t dim, int64_t n_power_iterations, double eps) {
  check_weight(op, weight);
  const MatrixShape shape = matrix_shape(weight, wrap_dim(op, weight, dim));
  check_vectors(op, weight, u, v, shape);
  check_iterations(op, n_power_iterations, eps);
  return shape;
}

MatrixShape check_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& weight_sn,
                                const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  check_weight(op, weight_sn);
  TORCH_CHECK_VALUE(grad.sizes() == weight_sn.sizes(), op, ": grad must have weight_sn's shape ", weight_sn.sizes(),
                    ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == weight_sn.scalar_type(), op, ": grad must have weight_sn's dtype ",
                   weight_sn.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == weight_sn.device(), op, ": grad must be on weight_sn's device ", weight_sn.device(),
              ", got ", grad.device());
  TORCH_CHECK_VALUE(sigma.numel() == 1, op, ": sigma must hold one value, got shape ", sigma.sizes());
  const MatrixShape shape = matrix_shape(weight_sn, wrap_dim(op, weight_sn, dim));
  check_vectors(op, weight_sn, u, v, shape);
  return shape;
}

void check_scaling(const char* op, const at::Tensor& weight, const Scaling& scaling) {
  if (scaling.coeff.has_value())
    TORCH_CHECK_VALUE(*scaling.coeff > 0 && *scaling.coeff < std::numeric_limits<double>::infinity(), op,
                      ": coeff must be a positive finite number, got ", *scaling.coeff);
  if (scaling.gamma.has_value()) {
    const at::Tensor& gamma = *scaling.gamma;
    TORCH_CHECK_VALUE(gamma.numel() == 1, op, ": gamma must hold one value, got shape ", gamma.sizes());
    const auto dtype = gamma.scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                     ": gamma must be float16, bfloat16, float32 or float64, got ", dtype);
    TORCH_CHECK(gamma.device() == weight.device(), op, ": gamma must be on the weight's device ", weight.device(),
                ", got ", gamma.device());
  }
}

MatrixShape check_scaled_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& weight,
                                       const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma, int64_t dim,
                                       const Scaling& scaling) {
  const MatrixShape shape = check_backward_args(op, grad, weight, u, v, sigma, dim);
  check_scaling(op, weight, scaling);
  return shape;
}

namespace {

std::string layer_op(const char* op, size_t layer) {
  return std::string(op) + " (layer " + std::to_string(layer) + ")";
}

// Same length as `weights` (the first list), and the first weight's dtype and device for every tensor of a list.
void check_list(const char* op, const char* name, at::TensorList list, at::TensorList weights) {
  TORCH_CHECK_VALUE(list.size() == weights.size(), op, ": ", name, " must hold one tensor per weight (", weights.size(),
                    "), got ", list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK_TYPE(list[i].scalar_type() == weights[0].scalar_type(), op, ": ", name, "[", i, "] has dtype ",
                     list[i].scalar_type(), " but the first weight has ", weights[0].scalar_type(),
                     ": one call takes tensors of one dtype and device (grouped_spectral_norm groups them so)");
    TORCH_CHECK(list[i].device() == weights[0].device(), op, ": ", name, "[", i, "] is on ", list[i].device(),
                " but the first weight is on ", weights[0].device(),
                ": one call takes tensors of one dtype and device (grouped_spectral_norm groups them so)");
  }
}

void check_dims_count(const char* op, at::IntArrayRef dims, at::TensorList weights) {
  TORCH_CHECK_VALUE(!weights.empty(), op, ": weights must hold at least one tensor");
  TORCH_CHECK_VALUE(dims.size() == weights.size(), op, ": dims must hold one value per weight (", weights.size(),
                    "), got ", dims.size());
}

}  // namespace

std::vector<MatrixShape> check_grouped_forward_args(const char* op, at::TensorList weights, at::TensorList us,
                                                    at::TensorList vs, at::IntArrayRef dims, int64_t n_power_iterations,
                                                    double eps, const LayerOrders& v_first,
                                                    const LayerScalings& scalings) {
  check_dims_count(op, dims, weights);
  const auto check_count = [&](const char* name, bool given, size_t size) {
    TORCH_CHECK_VALUE(!given || size == weights.size(), op, ": ", name, " must hold one value per weight (",
                      weights.size(), "), got ", size);
  };
  check_count("v_first", v_first.has_value(), v_first.has_value() ? v_first->size() : 0);
  check_count("coeffs", scalings.coeffs.has_value(), scalings.coeffs.has_value() ? scalings.coeffs->size() : 0);
  check_count("gammas", scalings.gammas.has_value(), scalings.gammas.has_value() ? scalings.gammas->size() : 0);
  check_count("sigma_grad", scalings.sigma_grad.has_value(),
              scalings.sigma_grad.has_value() ? scalings.sigma_grad->size() : 0);
  for (const auto& [name, list] : {std::pair<const char*, at::TensorList>{"weights", weights}, {"us", us}, {"vs", vs}})
    check_list(op, name, list, weights);
  std::vector<MatrixShape> shapes;
  for (size_t i = 0; i < weights.size(); ++i) {
    const std::string layer = layer_op(op, i);
    shapes.push_back(check_forward_args(layer.c_str(), weights[i], us[i], vs[i], dims[i], n_power_iterations, eps));
    check_scaling(layer.c_str(), weights[i], scalings.of(i));
  }
  return shapes;
}

std::vector<MatrixShape> check_grouped_backward_args(const char* op, at::TensorList grads, at::TensorList weights_sn,
                                                     at::TensorList us, at::TensorList vs, const at::Tensor& sigmas,
                                                     at::IntArrayRef dims) {
  check_dims_count(op, dims, weights_sn);
  for (const auto& [name, list] :
       {std::pair<const char*, at::TensorList>{"grads", grads}, {"weights_sn", weights_sn}, {"us", us}, {"vs", vs}})
    check_list(op, name, list, weights_sn);
  TORCH_CHECK_VALUE(sigmas.dim() == 1 && sigmas.size(0) == static_cast<int64_t>(weights_sn.size()), op,
                    ": sigmas must be a vector of one value per weight (", weights_sn.size(), "), got shape ",
                    sigmas.sizes());
  TORCH_CHECK_TYPE(sigmas.scalar_type() == sigma_dtype(weights_sn[0].scalar_type()), op, ": sigmas must be ",
                   sigma_dtype(weights_sn[0].scalar_type()), " for ", weights_sn[0].scalar_type(), " weights, got ",
                   sigmas.scalar_type());
  TORCH_CHECK(sigmas.device() == weights_sn[0].device(), op, ": sigmas must be on the weights' device ",
              weights_sn[0].device(), ", got ", sigmas.device());
  std::vector<MatrixShape> shapes;
  for (size_t i = 0; i < weights_sn.size(); ++i)
    shapes.push_back(
        check_backward_args(layer_op(op, i).c_str(), grads[i], weights_sn[i], us[i], vs[i], sigmas[i], dims[i]));
  return shapes;
}

WeightShapedOutput::WeightShapedOutput(const at::Tensor& like, const MatrixShape& shape, int64_t column_groups)
    : tensor(at::empty_like(like)), view3d(as_matrix3d(tensor, shape, column_groups)) {
  // The memory order's matrix is chosen for a `like` in that layout, which empty_like keeps: a view, nothing to copy.
  TORCH_INTERNAL_ASSERT(column_groups == 0 || view3d.is_alias_of(tensor));
}

at::Tensor WeightShapedOutput::finish() {
  if (!view3d.is_alias_of(tensor)) tensor.copy_(view3d.view(tensor.sizes()));
  return tensor;
}

namespace {

std::vector<int64_t> dim_first_order(int64_t ndim, int64_t dim) {
  std::vector<int64_t> order{dim};
  for (int64_t d = 0; d < ndim; ++d)
    if (d != dim) order.push_back(d);
  return order;
}

}  // namespace

at::Tensor to_matrix(const at::Tensor& t, int64_t dim) {
  return t.permute(dim_first_order(t.dim(), dim)).reshape({t.size(dim), -1});
}

at::Tensor rank_one(const at::Tensor& u, const at::Tensor& v, const at::Tensor& like, int64_t dim) {
  const auto order = dim_first_order(like.dim(), dim);
  std::vector<int64_t> permuted_sizes, inverse(order.size());
  for (size_t k = 0; k < order.size(); ++k) {
    permuted_sizes.push_back(like.size(order[k]));
    inverse[order[k]] = static_cast<int64_t>(k);
  }
  return at::outer(u, v).reshape(permuted_sizes).permute(inverse);
}

at::ScalarType sigma_dtype(at::ScalarType weight_dtype) {
  return weight_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace sn_ext
