// Autograd for the differentiable ops, in C++ (device-agnostic: the Autograd key, calling the ops through the
// dispatcher). Python's torch.library.register_autograd would do the same job, and does when the compiled
// library is absent (sn_ext/ops.py), but its Python wrapper costs ~80 us per layer and step on a CPU: more than
// the fused kernels themselves on small layers.
//
// W_sn = W / sigma(W) with sigma = u^T W v and u, v held constant (as torch does):
//   dL/dW = (G - <G, W_sn> u v^T) / sigma  +  g_sigma u v^T.
// Double backward (gradient penalties, gradgradcheck), with out = (G - lam P) / sigma, lam = <G, S>, P = u v^T:
//   dG = (H - <H, P> S) / sigma,   dS = -<H, P> G / sigma,   dsigma = -<H, out> / sigma.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace sn_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, bool);
using BackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, int64_t);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_forward(const at::Tensor& weight,
                                                                        const at::Tensor& u, const at::Tensor& v,
                                                                        int64_t dim, int64_t n, double eps,
                                                                        bool v_first) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sn_ext::spectral_normalize", "")
                             .typed<ForwardSignature>();
  return op.call(weight, u, v, dim, n, eps, v_first);
}

at::Tensor call_backward(const at::Tensor& grad, const at::Tensor& weight_sn, const at::Tensor& u,
                         const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sn_ext::spectral_normalize_backward", "")
                             .typed<BackwardSignature>();
  return op.call(grad, weight_sn, u, v, sigma, dim);
}

std::vector<int64_t> dim_first_order(int64_t ndim, int64_t dim) {
  std::vector<int64_t> order{dim};
  for (int64_t d = 0; d < ndim; ++d)
    if (d != dim) order.push_back(d);
  return order;
}

// torch's matrix view of a weight-shaped tensor (a copy when dim != 0; only the double backward uses it).
at::Tensor to_matrix(const at::Tensor& t, int64_t dim) {
  return t.permute(dim_first_order(t.dim(), dim)).reshape({t.size(dim), -1});
}

// u v^T in the layout of `like`: the gradient of sigma = u^T W v.
at::Tensor rank_one(const at::Tensor& u, const at::Tensor& v, const at::Tensor& like, int64_t dim) {
  const auto order = dim_first_order(like.dim(), dim);
  std::vector<int64_t> permuted_sizes, inverse(order.size());
  for (size_t k = 0; k < order.size(); ++k) {
    permuted_sizes.push_back(like.size(order[k]));
    inverse[order[k]] = static_cast<int64_t>(k);
  }
  return at::outer(u, v).reshape(permuted_sizes).permute(inverse);
}

int64_t wrapped(int64_t dim, const at::Tensor& t) { return dim < 0 ? dim + t.dim() : dim; }

class SpectralNormalize : public torch::autograd::Function<SpectralNormalize> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& u,
                               const at::Tensor& v, int64_t dim, int64_t n, double eps, bool v_first) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [weight_sn, sigma, u_new, v_new] = call_forward(weight, u, v, dim, n, eps, v_first);
    ctx->mark_non_differentiable({u_new, v_new});
    ctx->set_materialize_grads(false);  // callers usually ignore sigma: no zero tensor for its gradient
    ctx->save_for_backward({weight_sn, sigma, u_new, v_new});
    ctx->saved_data["dim"] = wrapped(dim, weight);
    return {weight_sn, sigma, u_new, v_new};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // as below
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &weight_sn = saved[0], &sigma = saved[1], &u = saved[2], &v = saved[3];
    const int64_t dim = ctx->saved_data["dim"].toInt();
    at::Tensor grad_weight;
    if (grads[0].defined()) grad_weight = call_backward(grads[0], weight_sn, u, v, sigma, dim);
    if (grads[1].defined()) {
      const at::Tensor from_sigma =
          (grads[1] * rank_one(u.to(sigma.scalar_type()), v.to(sigma.scalar_type()), weight_sn, dim))
              .to(weight_sn.scalar_type());
      grad_weight = grad_weight.defined() ? grad_weight + from_sigma : from_sigma;
    }
    return {grad_weight, {}, {}, {}, {}, {}, {}};
  }
};

class SpectralNormalizeBackward : public torch::autograd::Function<SpectralNormalizeBackward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& weight_sn,
                               const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = call_backward(grad, weight_sn, u, v, sigma, dim);
    ctx->save_for_backward({grad, weight_sn, u, v, sigma, out});
    ctx->saved_data["dim"] = wrapped(dim, weight_sn);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // A backward run under autocast must not cast these sums (at::mv is on CUDA autocast's float16 list).
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad = saved[0], &weight_sn = saved[1], &u = saved[2], &v = saved[3], &sigma = saved[4],
                     &out = saved[5];
    const at::Tensor& h = grads[0];
    if (!h.defined()) return {{}, {}, {}, {}, {}, {}};
    const auto acc = sigma.scalar_type();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const at::Tensor h_acc = h.to(acc);
    const at::Tensor h_p = at::dot(u.to(acc), at::mv(to_matrix(h_acc, dim), v.to(acc)));
    const at::Tensor d_grad = ((h_acc - h_p * weight_sn.to(acc)) / sigma).to(grad.scalar_type());
    const at::Tensor d_weight_sn = (-h_p / sigma * grad.to(acc)).to(weight_sn.scalar_type());
    const at::Tensor d_sigma = -(h_acc * out.to(acc)).sum() / sigma;
    return {d_grad, d_weight_sn, {}, {}, d_sigma, {}};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_normalize_autograd(
    const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, int64_t dim, int64_t n, double eps,
    bool v_first) {
  auto out = SpectralNormalize::apply(weight, u, v, dim, n, eps, v_first);
  return {out[0], out[1], out[2], out[3]};
}

at::Tensor spectral_normalize_backward_autograd(const at::Tensor& grad, const at::Tensor& weight_sn,
                                                const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma,
                                                int64_t dim) {
  return SpectralNormalizeBackward::apply(grad, weight_sn, u, v, sigma, dim)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, Autograd, m) {
  m.impl("spectral_normalize", &spectral_normalize_autograd);
  m.impl("spectral_normalize_backward", &spectral_normalize_backward_autograd);
}

}  // namespace sn_ext
