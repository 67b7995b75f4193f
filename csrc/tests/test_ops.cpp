// C++ check of the compiled operators through the dispatcher (as a libtorch user calls them), against the
// same math written with ATen ops. Exits non-zero on the first failure.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, at::Tensor&, at::Tensor&,
                                                                           int64_t, int64_t, double, bool,
                                                                           std::optional<double>,
                                                                           const std::optional<at::Tensor>&, bool);
using Backward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t);
using ScaledBackward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          const at::Tensor&, const at::Tensor&, int64_t,
                                                          std::optional<double>, const std::optional<at::Tensor>&,
                                                          bool);

auto forward_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("sn_ext::spectral_normalize_", "").typed<Forward>();
}
auto backward_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("sn_ext::spectral_normalize_backward", "").typed<Backward>();
}
auto scaled_backward_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("sn_ext::spectral_normalize_scaled_backward", "")
      .typed<ScaledBackward>();
}

at::Tensor matrix_of(const at::Tensor& w, int64_t dim) {
  std::vector<int64_t> order{dim};
  for (int64_t d = 0; d < w.dim(); ++d)
    if (d != dim) order.push_back(d);
  return w.permute(order).flatten(1);
}

at::Tensor unit(at::Tensor x) {
  return x / x.norm();
}

// One u-first round and W / sigma, as torch.nn.utils.parametrizations.spectral_norm computes them.
void check_forward_and_backward(std::vector<int64_t> shape, int64_t dim) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor w = torch::randn(shape, opts);
  const at::Tensor m = matrix_of(w, dim);
  at::Tensor u = unit(torch::randn({m.size(0)}, opts)), v = unit(torch::randn({m.size(1)}, opts));

  const at::Tensor u_ref = unit(at::mv(m, v));
  const at::Tensor v_ref = unit(at::mv(m.t(), u_ref));
  const at::Tensor sigma_ref = at::dot(u_ref, at::mv(m, v_ref));
  const auto [w_sn, sigma, u_new, v_new] =
      forward_op().call(w, u, v, dim, 1, 1e-12, false, std::nullopt, std::nullopt, true);
  const std::string name = "shape " + c10::str(w.sizes()) + " dim " + std::to_string(dim);
  expect(max_abs_diff(u_new, u_ref) < 1e-12 && max_abs_diff(v_new, v_ref) < 1e-12, name + ": u, v after one round");
  expect(at::equal(u, u_new) && at::equal(v, v_new), name + ": u, v updated in place");
  expect(max_abs_diff(sigma, sigma_ref) < 1e-12, name + ": sigma");
  expect(max_abs_diff(w_sn, w / sigma_ref) < 1e-12, name + ": weight / sigma");

  const at::Tensor g = torch::randn(shape, opts);
  const at::Tensor outer = at::outer(u_ref, v_ref);
  at::Tensor grad_ref = (matrix_of(g, dim) - (g * w_sn).sum() * outer) / sigma_ref;
  const at::Tensor grad = backward_op().call(g, w_sn, u_new, v_new, sigma, dim);
  expect(max_abs_diff(matrix_of(grad, dim), grad_ref) < 1e-12, name + ": rank-1 corrected gradient");
}

// sigma-reparam bounded by coeff (W gamma c / max(sigma, c), with sigma > c), against the same math in ATen ops.
void check_scaled_form() {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor w = torch::randn({6, 4}, opts);
  at::Tensor u = unit(torch::randn({6}, opts)), v = unit(torch::randn({4}, opts));
  const at::Tensor gamma = torch::full({}, 0.7, opts);
  const double coeff = 0.25;
  const auto [w_hat, sigma, u_new, v_new] = forward_op().call(w, u, v, 0, 3, 1e-12, false, coeff, gamma, true);
  const double s = sigma.item<double>();
  expect(s > coeff, "scaled form: sigma above coeff");
  expect(max_abs_diff(w_hat, w * (0.7 * coeff / s)) < 1e-12, "scaled form: weight * gamma c / max(sigma, c)");
  const at::Tensor g = torch::randn({6, 4}, opts);
  const auto [grad_w, grad_gamma] = scaled_backward_op().call(g, w, u_new, v_new, sigma, 0, coeff, gamma, true);
  const at::Tensor mu = (g * w).sum() / s;
  expect(max_abs_diff(grad_w, (g - mu * at::outer(u_new, v_new)) * (0.7 * coeff / s)) < 1e-12,
         "scaled form: gradient of the weight");
  expect(max_abs_diff(grad_gamma, mu * coeff) < 1e-12, "scaled form: gradient of gamma");
}

void check_integer_weight_is_refused() {
  const at::Tensor w = torch::ones({3, 4}, at::kLong);
  try {
    at::Tensor u = torch::ones({3}, at::kLong), v = torch::ones({4}, at::kLong);
    forward_op().call(w, u, v, 0, 1, 1e-12, false, std::nullopt, std::nullopt, true);
    expect(false, "integer weight raises");
  } catch (const c10::Error& e) {
    expect(std::string(e.what()).find("weight must be") != std::string::npos, "integer weight raises, naming weight");
  }
}

}  // namespace

int main() {
  torch::manual_seed(0);
  check_forward_and_backward({7, 5}, 0);
  check_forward_and_backward({16, 3, 3, 3}, 0);
  check_forward_and_backward({6, 10, 3, 3}, 1);  // ConvTranspose2d layout: read in place, no copy
  check_forward_and_backward({13, 1}, 0);
  check_scaled_form();
  check_integer_weight_is_refused();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
