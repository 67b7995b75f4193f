// Autograd for the differentiable ops, in C++ (device-agnostic: the Autograd key, calling the ops through the
// dispatcher): for the compiled ops, registered below, and for the other backends' ops (Triton, reference), which
// sn_ext/_autograd.py registers at run time through register_autograd(). sn_ext/_autograd.py's torch.autograd
// Functions do the same job when the compiled library is absent, but a Python autograd wrapper costs ~80-290 us per
// layer and step on a CPU: more than the fused kernels themselves on small layers.
//
// W_sn = W / sigma(W) with sigma = u^T W v and u, v held constant (as torch does):
//   dL/dW = (G - <G, W_sn> u v^T) / sigma  +  g_sigma u v^T.
// Double backward (gradient penalties, gradgradcheck), with out = (G - lam P) / sigma, lam = <G, S>, P = u v^T:
//   dG = (H - <H, P> S) / sigma,   dS = -<H, P> G / sigma,   dsigma = -<H, out> / sigma.
//
// The scaled forms (coeff, gamma or sigma_grad=False; csrc/sn_ext.cpp), W_hat = s W with s = g / d, d = max(sigma, f),
// g = gamma c: the node saves W itself (an input: no copy) and gamma, and calls the scaled backward op, which returns
// dL/dW = s (G - k mu P) and dL/dgamma = mu c, mu = <G, W> / d (k = 0 where sigma <= f or sigma_grad=False).
// Its double backward, with m = 1 / d, A = h c - s k <H, P> (h: gamma's incoming gradient):
//   dG = s H + m A W,   dW = m A G,   dsigma = -m^2 (g (<H, G> - k mu <H, P>) + <G, W> A) where d = sigma (else 0),
//   dgamma = c m (<H, G> - k mu <H, P>).
#include "autograd.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "matrix_view.h"

namespace sn_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, at::Tensor&,
                                                                                    at::Tensor&, int64_t, int64_t,
                                                                                    double, bool, std::optional<double>,
                                                                                    const std::optional<at::Tensor>&,
                                                                                    bool);
using BackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, int64_t);
using ScaledBackwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, int64_t, std::optional<double>,
                                                                   const std::optional<at::Tensor>&, bool);

// Below ADInplaceOrView nothing bumped the versions of the vectors an op updated in place: do it, as an in-place
// aten op would (autograd then refuses a backward through anything that saved them before the update).
void bump_versions(at::TensorList tensors) {
  for (const auto& t : tensors) torch::autograd::impl::bump_version(t);
}

// A backend's set of ops (sn_ext.backends): its forward, with spectral_normalize_'s schema, and the backwards its
// formulas call, with spectral_normalize_backward's and spectral_normalize_scaled_backward's. The compiled ops are
// one set; the Triton and reference backends' ops are others, registered at run time by register_autograd(). Looked
// up on first use: the compiled set's kernels register while the library loads, possibly before its schemas are
// defined. Never freed (the autograd graph refers to a set by address).
class OpSet {
 public:
  OpSet(std::string forward, std::string backward, std::string scaled_backward)
      : forward_name_(std::move(forward)),
        backward_name_(std::move(backward)),
        scaled_backward_name_(std::move(scaled_backward)) {}

  const std::string& forward_name() const { return forward_name_; }
  const c10::TypedOperatorHandle<ForwardSignature>& forward() const {
    resolve();
    return *forward_;
  }
  const c10::TypedOperatorHandle<BackwardSignature>& backward() const {
    resolve();
    return *backward_;
  }
  const c10::TypedOperatorHandle<ScaledBackwardSignature>& scaled_backward() const {
    resolve();
    return *scaled_backward_;
  }

 private:
  void resolve() const {
    std::call_once(resolved_, [this] {
      auto& dispatcher = c10::Dispatcher::singleton();
      forward_.emplace(dispatcher.findSchemaOrThrow(forward_name_.c_str(), "").typed<ForwardSignature>());
      backward_.emplace(dispatcher.findSchemaOrThrow(backward_name_.c_str(), "").typed<BackwardSignature>());
      scaled_backward_.emplace(
          dispatcher.findSchemaOrThrow(scaled_backward_name_.c_str(), "").typed<ScaledBackwardSignature>());
    });
  }

  const std::string forward_name_, backward_name_, scaled_backward_name_;
  mutable std::once_flag resolved_;
  mutable std::optional<c10::TypedOperatorHandle<ForwardSignature>> forward_;
  mutable std::optional<c10::TypedOperatorHandle<BackwardSignature>> backward_;
  mutable std::optional<c10::TypedOperatorHandle<ScaledBackwardSignature>> scaled_backward_;
};

const OpSet compiled_ops{"sn_ext::spectral_normalize_", "sn_ext::spectral_normalize_backward",
                         "sn_ext::spectral_normalize_scaled_backward"};

at::Tensor call_backward(const at::Tensor& grad, const at::Tensor& weight_sn, const at::Tensor& u, const at::Tensor& v,
                         const at::Tensor& sigma, int64_t dim) {
  return compiled_ops.backward().call(grad, weight_sn, u, v, sigma, dim);
}

// A forward's scaled form as its backward needs it: the op's coeff and sigma_grad, and whether it had a gamma.
struct ScaledForm {
  std::optional<double> coeff;
  bool has_gamma;
  bool sigma_grad;
  // Whether the backward is the scaled one (W / sigma with its gradient through sigma is the plain one).
  bool scaled() const { return coeff.has_value() || has_gamma || !sigma_grad; }
};

int64_t wrapped(int64_t dim, const at::Tensor& t) {
  return dim < 0 ? dim + t.dim() : dim;
}

// The set's forward op below autograd, u and v updated in place (their versions bumped).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_forward(
    const OpSet& ops, const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t dim, int64_t n, double eps,
    bool v_first, std::optional<double> coeff, const std::optional<at::Tensor>& gamma, bool sigma_grad) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    result = ops.forward().call(weight, u, v, dim, n, eps, v_first, coeff, gamma, sigma_grad);
  }
  bump_versions({u, v});
  return result;
}

// torch's pointer to a Node: std::shared_ptr up to torch 2.11, c10::intrusive_ptr later.
using NodePtr = decltype(std::declval<torch::autograd::Node&>().getptr());

template <class T, class... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>)
    return std::make_shared<T>(std::forward<Args>(args)...);
  else
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
}

// The backward node of a set's forward op, written as torch writes its own ops' nodes rather than as a
// torch::autograd::Function: Function::apply and its CppNode fill a context (a string-keyed map of IValues for dim
// and the set, VariableInfo for every input and output, a non-differentiable set) and check it all again in the
// backward, ~4 us of a small layer's CPU train step (benchmarks/module_overhead.py). Its edges are W's, u's and v's
// (and gamma's, where given), as Function::apply's were (a u that requires grad gives W_sn a grad_fn, with no
// gradient for u). Autograd saves the vectors used (fresh tensors), not the buffers u and v, so that a second call
// before this one's backward may update the buffers again.
struct SpectralNormalizeNode : public torch::autograd::Node {
  SpectralNormalizeNode(const OpSet* ops, int64_t dim, ScaledForm form, torch::autograd::edge_list&& next_edges)
      : Node(std::move(next_edges)), ops_(ops), dim_(dim), form_(std::move(form)) {}

  std::string name() const override { return "SpectralNormalizeBackward0"; }

  // The plain form's backward reads W_sn, an output of the forward (saved as one: no reference cycle through its
  // grad_fn); a scaled form's reads the weight and gamma, inputs (W_sn cannot give gamma's gradient at gamma = 0).
  void save(const at::Tensor& weight, const std::optional<at::Tensor>& gamma, const at::Tensor& weight_sn,
            const at::Tensor& sigma, const at::Tensor& u, const at::Tensor& v) {
    const bool scaled = form_.scaled();
    weight_ = torch::autograd::SavedVariable(scaled ? weight : weight_sn, /*is_output=*/!scaled);
    if (gamma.has_value()) gamma_ = torch::autograd::SavedVariable(*gamma, /*is_output=*/false);
    sigma_ = torch::autograd::SavedVariable(sigma, /*is_output=*/true);
    u_ = torch::autograd::SavedVariable(u, /*is_output=*/false);
    v_ = torch::autograd::SavedVariable(v, /*is_output=*/false);
  }

  // grads: W_sn's and sigma's, either undefined when unused (a caller that ignores sigma gets no zero tensor).
  variable_list apply(variable_list&& grads) override {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // as SpectralNormalizeBackward
    variable_list out(num_outputs());  // W's gradient (and gamma's); none for u, v
    const bool want_gamma = form_.has_gamma && should_compute_output(3) && grads[0].defined();
    if ((!should_compute_output(0) && !want_gamma) || (!grads[0].defined() && !grads[1].defined())) return out;
    const auto self = getptr();
    // W_sn for the plain form, W for a scaled one (see save).
    const at::Tensor weight = weight_.unpack(self), sigma = sigma_.unpack(self), u = u_.unpack(), v = v_.unpack();
    at::Tensor grad_weight;
    if (grads[0].defined() && form_.scaled()) {
      std::optional<at::Tensor> gamma;
      if (form_.has_gamma) gamma = gamma_.unpack();
      auto [from_output, grad_gamma] =
          ops_->scaled_backward().call(grads[0], weight, u, v, sigma, dim_, form_.coeff, gamma, form_.sigma_grad);
      grad_weight = std::move(from_output);
      if (want_gamma) out[3] = std::move(grad_gamma);
    } else if (grads[0].defined()) {
      grad_weight = ops_->backward().call(grads[0], weight, u, v, sigma, dim_);
    }
    if (grads[1].defined()) {
      const at::Tensor from_sigma =
          (grads[1] * rank_one(u.to(sigma.scalar_type()), v.to(sigma.scalar_type()), weight, dim_))
              .to(weight.scalar_type());
      grad_weight = grad_weight.defined() ? grad_weight + from_sigma : from_sigma;
    }
    if (should_compute_output(0)) out[0] = std::move(grad_weight);
    return out;
  }

  void release_variables() override {
    weight_.reset_data();
    gamma_.reset_data();
    sigma_.reset_data();
    u_.reset_data();
    v_.reset_data();
  }

 private:
  const OpSet* ops_;
  const int64_t dim_;
  const ScaledForm form_;
  torch::autograd::SavedVariable weight_, gamma_, sigma_, u_, v_;
};

class SpectralNormalizeBackward : public torch::autograd::Function<SpectralNormalizeBackward> {
 public:
  static variable_list forward(AutogradContext* ctx, const OpSet* ops, const at::Tensor& grad,
                               const at::Tensor& weight_sn, const at::Tensor& u, const at::Tensor& v,
                               const at::Tensor& sigma, int64_t dim) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = ops->backward().call(grad, weight_sn, u, v, sigma, dim);
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
    if (!h.defined()) return {{}, {}, {}, {}, {}, {}, {}};
    const auto acc = sigma.scalar_type();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const at::Tensor h_acc = h.to(acc);
    const at::Tensor h_p = at::dot(u.to(acc), at::mv(to_matrix(h_acc, dim), v.to(acc)));
    const at::Tensor d_grad = ((h_acc - h_p * weight_sn.to(acc)) / sigma).to(grad.scalar_type());
    const at::Tensor d_weight_sn = (-h_p / sigma * grad.to(acc)).to(weight_sn.scalar_type());
    const at::Tensor d_sigma = -(h_acc * out.to(acc)).sum() / sigma;
    return {{}, d_grad, d_weight_sn, {}, {}, d_sigma, {}};
  }
};

// The scaled backward op, differentiable (its formulas: the top of this file).
class SpectralNormalizeScaledBackward : public torch::autograd::Function<SpectralNormalizeScaledBackward> {
 public:
  static variable_list forward(AutogradContext* ctx, const OpSet* ops, const at::Tensor& grad, const at::Tensor& weight,
                               const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma, int64_t dim,
                               std::optional<double> coeff, const std::optional<at::Tensor>& gamma, bool sigma_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_weight, grad_gamma] =
        ops->scaled_backward().call(grad, weight, u, v, sigma, dim, coeff, gamma, sigma_grad);
    ctx->save_for_backward({grad, weight, u, v, sigma, gamma.value_or(at::Tensor())});
    ctx->saved_data["dim"] = wrapped(dim, weight);
    ctx->saved_data["coeff"] = coeff;
    ctx->saved_data["sigma_grad"] = sigma_grad;
    return {grad_weight, grad_gamma};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad = saved[0], &weight = saved[1], &u = saved[2], &v = saved[3], &sigma = saved[4],
                     &gamma = saved[5];
    const at::Tensor &h = grads[0], &h_gamma = grads[1];
    variable_list out(10);  // ops, grad, weight, u, v, sigma, dim, coeff, gamma, sigma_grad
    if (!h.defined() && !h_gamma.defined()) return out;
    const auto acc = sigma.scalar_type();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const auto coeff_value = ctx->saved_data["coeff"];
    const std::optional<double> coeff =
        coeff_value.isNone() ? std::nullopt : std::optional<double>(coeff_value.toDouble());
    const double c = coeff.value_or(1.0);
    const at::Tensor g = grad.to(acc), w = weight.to(acc), sig = sigma.to(acc);
    const at::Tensor divisor = coeff.has_value() ? at::clamp_min(sig, *coeff) : sig;
    const at::Tensor m = divisor.reciprocal();
    const at::Tensor numerator = gamma.defined() ? gamma.to(acc).reshape({}).mul(c) : at::scalar_tensor(c, m.options());
    const at::Tensor s = numerator * m;
    at::Tensor k = at::scalar_tensor(ctx->saved_data["sigma_grad"].toBool() ? 1.0 : 0.0, m.options());
    if (coeff.has_value()) k = k * (sig > *coeff).to(acc);
    const at::Tensor g_w = (g * w).sum(), mu = g_w * m;
    at::Tensor a = at::zeros_like(m), h_g = at::zeros_like(m), h_p = at::zeros_like(m);
    if (h_gamma.defined()) a = h_gamma.to(acc).reshape({}) * c;
    if (h.defined()) {
      const at::Tensor h_acc = h.to(acc);
      h_p = at::dot(u.to(acc), at::mv(to_matrix(h_acc, dim), v.to(acc)));
      h_g = (h_acc * g).sum();
      a = a - s * k * h_p;
    }
    at::Tensor d_grad = a * m * w;
    if (h.defined()) d_grad = d_grad + s * h.to(acc);
    out[1] = d_grad.to(grad.scalar_type());
    out[2] = (a * m * g).to(weight.scalar_type());
    const at::Tensor through_sigma = coeff.has_value() ? (sig > *coeff).to(acc) : at::ones_like(m);
    out[5] = (-(m * m) * through_sigma * (numerator * (h_g - k * mu * h_p) + g_w * a)).to(sigma.scalar_type());
    if (gamma.defined()) out[8] = (m * c * (h_g - k * mu * h_p)).to(gamma.scalar_type()).reshape(gamma.sizes());
    return out;
  }
};

bool requires_grad(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs)
    if (t->requires_grad()) return true;
  return false;
}

// A dual tensor (forward-mode AD), whatever the grad mode: these ops have no jvp, and a call that did not refuse it
// would drop its tangent (a silently wrong Jacobian-vector product).
bool any_dual(std::initializer_list<const at::Tensor*> inputs) {
  for (const at::Tensor* t : inputs)
    if (t->_fw_grad(/*level=*/0).defined()) return true;
  return false;
}

// The Autograd kernels of a set's ops. When autograd records nothing (eval under no_grad, the backward op inside a
// backward without create_graph) they call the op directly: a node, its saved tensors and the outputs' history
// would be made for nothing (~1-2 us on a small layer's CPU step). The forward records SpectralNormalizeNode; the
// backward ops, which only a double backward records, go through their Functions (whose apply refuses a dual
// tensor).
auto forward_kernel(const OpSet* ops) {
  return [ops](const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t dim, int64_t n, double eps, bool v_first,
               std::optional<double> coeff, const std::optional<at::Tensor>& gamma,
               bool sigma_grad) -> std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> {
    const at::Tensor& gamma_or_none = gamma.has_value() ? *gamma : weight;  // weight: a stand-in checked twice
    TORCH_CHECK(!any_dual({&weight, &u, &v, &gamma_or_none}), ops->forward_name(),
                ": forward-mode AD (a dual tensor) is not supported: the op has no jvp formula");
    if (!requires_grad({&weight, &u, &v, &gamma_or_none}))
      return call_forward(*ops, weight, u, v, dim, n, eps, v_first, coeff, gamma, sigma_grad);
    auto result = call_forward(*ops, weight, u, v, dim, n, eps, v_first, coeff, gamma, sigma_grad);
    const auto& [weight_sn, sigma, u_used, v_used] = result;
    const ScaledForm form{coeff, gamma.has_value(), sigma_grad};
    auto node =
        make_node<SpectralNormalizeNode>(ops, wrapped(dim, weight), form,
                                         gamma.has_value() ? torch::autograd::collect_next_edges(weight, u, v, *gamma)
                                                           : torch::autograd::collect_next_edges(weight, u, v));
    torch::autograd::set_history(weight_sn, node);  // the node's input 0
    torch::autograd::set_history(sigma, node);      // input 1
    static_cast<SpectralNormalizeNode*>(node.get())->save(weight, gamma, weight_sn, sigma, u_used, v_used);
    return result;
  };
}

auto backward_kernel(const OpSet* ops) {
  return [ops](const at::Tensor& grad, const at::Tensor& weight_sn, const at::Tensor& u, const at::Tensor& v,
               const at::Tensor& sigma, int64_t dim) -> at::Tensor {
    const std::initializer_list<const at::Tensor*> inputs{&grad, &weight_sn, &u, &v, &sigma};
    if (!requires_grad(inputs) && !any_dual(inputs)) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return ops->backward().call(grad, weight_sn, u, v, sigma, dim);
    }
    return SpectralNormalizeBackward::apply(ops, grad, weight_sn, u, v, sigma, dim)[0];
  };
}

auto scaled_backward_kernel(const OpSet* ops) {
  return [ops](const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
               const at::Tensor& sigma, int64_t dim, std::optional<double> coeff,
               const std::optional<at::Tensor>& gamma, bool sigma_grad) -> std::tuple<at::Tensor, at::Tensor> {
    const at::Tensor& gamma_or_none = gamma.has_value() ? *gamma : grad;
    const std::initializer_list<const at::Tensor*> inputs{&grad, &weight, &u, &v, &sigma, &gamma_or_none};
    if (!requires_grad(inputs) && !any_dual(inputs)) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return ops->scaled_backward().call(grad, weight, u, v, sigma, dim, coeff, gamma, sigma_grad);
    }
    const auto out =
        SpectralNormalizeScaledBackward::apply(ops, grad, weight, u, v, sigma, dim, coeff, gamma, sigma_grad);
    return {out[0], out[1]};
  };
}

// ---- grouped mode: every layer's forward in one op, and their backward in one op ----

using GroupedForwardSignature =
    std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>(
        at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef, int64_t, double, const LayerOrders&,
        const LayerCoeffs&, const LayerGammas&, const LayerSigmaGrads&);
using GroupedBackwardSignature = std::vector<at::Tensor>(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                                         const at::Tensor&, at::IntArrayRef);

// Outputs of the grouped forward, flattened for autograd: L weights_sn, sigmas, L us_used, L vs_used. The plain
// form's backward is the grouped backward op; the scaled forms' (coeffs, gammas or a sigma_grad false) the scaled
// backward op layer by layer, which saves the weights and gammas (inputs) instead of weights_sn.
class SpectralNormalizeGrouped : public torch::autograd::Function<SpectralNormalizeGrouped> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList weights, at::TensorList us, at::TensorList vs,
                               std::vector<int64_t> dims, int64_t n, double eps, const LayerOrders& v_first,
                               const std::optional<std::vector<double>>& coeffs, at::TensorList gammas,
                               const LayerSigmaGrads& sigma_grad) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("sn_ext::spectral_normalize_grouped_", "")
                               .typed<GroupedForwardSignature>();
    std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> result;
    const bool has_gammas = !gammas.empty();
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      result = op.call(weights, us, vs, dims, n, eps, v_first,
                       coeffs.has_value() ? LayerCoeffs(*coeffs) : LayerCoeffs(std::nullopt),
                       has_gammas ? LayerGammas(gammas) : LayerGammas(std::nullopt), sigma_grad);
    }
    bump_versions(us);
    bump_versions(vs);
    auto& [weights_sn, sigmas, us_used, vs_used] = result;
    const size_t layers = weights.size();
    for (size_t i = 0; i < layers; ++i) dims[i] = wrapped(dims[i], weights[i]);
    variable_list out(weights_sn.begin(), weights_sn.end());
    out.push_back(sigmas);
    out.insert(out.end(), us_used.begin(), us_used.end());
    out.insert(out.end(), vs_used.begin(), vs_used.end());
    ctx->mark_non_differentiable(variable_list(out.begin() + layers + 1, out.end()));
    ctx->set_materialize_grads(false);
    bool scaled = coeffs.has_value() || has_gammas;
    for (size_t i = 0; sigma_grad.has_value() && i < layers; ++i) scaled = scaled || !sigma_grad->get(i);
    if (scaled) {  // weights and gammas in place of weights_sn, the rest as the plain form's
      variable_list saved(weights.begin(), weights.end());
      saved.insert(saved.end(), out.begin() + layers, out.end());
      saved.insert(saved.end(), gammas.begin(), gammas.end());
      ctx->save_for_backward(saved);
      c10::List<bool> layer_sigma_grad;
      for (size_t i = 0; i < layers; ++i) layer_sigma_grad.push_back(!sigma_grad.has_value() || sigma_grad->get(i));
      ctx->saved_data["coeffs"] = coeffs;
      ctx->saved_data["sigma_grad"] = layer_sigma_grad;
    } else {
      ctx->save_for_backward(out);
    }
    ctx->saved_data["scaled"] = scaled;
    ctx->saved_data["dims"] = dims;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("sn_ext::spectral_normalize_grouped_backward", "")
                               .typed<GroupedBackwardSignature>();
    const auto saved = ctx->get_saved_variables();
    const size_t layers = (grads.size() - 1) / 3;
    const bool scaled = ctx->saved_data["scaled"].toBool();
    // weights_sn, or for the scaled forms the weights (then the gammas follow the vs).
    const std::vector<at::Tensor> weights(saved.begin(), saved.begin() + layers),
        us(saved.begin() + layers + 1, saved.begin() + 2 * layers + 1),
        vs(saved.begin() + 2 * layers + 1, saved.begin() + 3 * layers + 1),
        gammas(saved.begin() + 3 * layers + 1, saved.end());
    const at::Tensor& sigmas = saved[layers];
    const std::vector<int64_t> dims = ctx->saved_data["dims"].toIntVector();
    std::vector<at::Tensor> grads_weight(layers), grads_gamma(gammas.size());
    bool any = false;
    for (size_t i = 0; i < layers; ++i) any = any || grads[i].defined();
    if (any && scaled) {  // layer by layer (a double backward too: the op has one)
      const auto coeffs_value = ctx->saved_data["coeffs"];
      const auto sigma_grad = ctx->saved_data["sigma_grad"].toBoolList();
      for (size_t i = 0; i < layers; ++i) {
        if (!grads[i].defined()) continue;
        const std::optional<double> coeff =
            coeffs_value.isNone() ? std::nullopt : std::optional<double>(coeffs_value.toDoubleVector()[i]);
        const std::optional<at::Tensor> gamma = gammas.empty() ? std::nullopt : std::optional<at::Tensor>(gammas[i]);
        auto [grad_weight, grad_gamma] = compiled_ops.scaled_backward().call(
            grads[i], weights[i], us[i], vs[i], sigmas[i], dims[i], coeff, gamma, sigma_grad.get(i));
        grads_weight[i] = std::move(grad_weight);
        if (gamma.has_value()) grads_gamma[i] = std::move(grad_gamma);
      }
    } else if (any && at::GradMode::is_enabled()) {
      // create_graph=True: the per-layer backward ops, which have a double backward; sigmas[i] carries its part.
      for (size_t i = 0; i < layers; ++i)
        if (grads[i].defined()) grads_weight[i] = call_backward(grads[i], weights[i], us[i], vs[i], sigmas[i], dims[i]);
    } else if (any) {
      std::vector<at::Tensor> incoming(layers);
      for (size_t i = 0; i < layers; ++i)  // a layer left out of the loss: a zero gradient (rare; costs a launch)
        incoming[i] = grads[i].defined() ? grads[i] : at::zeros_like(weights[i]);
      grads_weight = op.call(incoming, weights, us, vs, sigmas, dims);
    }
    if (grads[layers].defined()) {  // sigmas used in the loss: d sigma_i / d W_i = u_i v_i^T
      for (size_t i = 0; i < layers; ++i) {
        const at::Tensor from_sigma = (grads[layers][i] * rank_one(us[i].to(sigmas.scalar_type()),
                                                                   vs[i].to(sigmas.scalar_type()), weights[i], dims[i]))
                                          .to(weights[i].scalar_type());
        grads_weight[i] = grads_weight[i].defined() ? grads_weight[i] + from_sigma : from_sigma;
      }
    }
    variable_list out(grads_weight.begin(), grads_weight.end());
    out.resize(3 * layers + 5);  // nothing for us, vs, dims, n, eps, v_first, coeffs
    out.insert(out.end(), grads_gamma.begin(), grads_gamma.end());
    out.emplace_back();  // sigma_grad
    return out;
  }
};

std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
spectral_normalize_grouped_autograd(at::TensorList weights, at::TensorList us, at::TensorList vs, at::IntArrayRef dims,
                                    int64_t n, double eps, const LayerOrders& v_first, const LayerCoeffs& coeffs,
                                    const LayerGammas& gammas, const LayerSigmaGrads& sigma_grad) {
  const size_t layers = weights.size();
  const std::optional<std::vector<double>> coeff_list =
      coeffs.has_value() ? std::optional<std::vector<double>>(coeffs->vec()) : std::nullopt;
  const auto out = SpectralNormalizeGrouped::apply(weights, us, vs, dims.vec(), n, eps, v_first, coeff_list,
                                                   gammas.value_or(at::TensorList()), sigma_grad);
  return {std::vector<at::Tensor>(out.begin(), out.begin() + layers), out[layers],
          std::vector<at::Tensor>(out.begin() + layers + 1, out.begin() + 2 * layers + 1),
          std::vector<at::Tensor>(out.begin() + 2 * layers + 1, out.end())};
}

// The grouped backward is not differentiable (a double backward takes the per-layer ops, see above); without an
// Autograd kernel of its own it would go through torch's boxed not-implemented fallback, ~10 us per call.
std::vector<at::Tensor> spectral_normalize_grouped_backward_autograd(at::TensorList grads, at::TensorList weights_sn,
                                                                     at::TensorList us, at::TensorList vs,
                                                                     const at::Tensor& sigmas, at::IntArrayRef dims) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sn_ext::spectral_normalize_grouped_backward", "")
                             .typed<GroupedBackwardSignature>();
  if (at::GradMode::is_enabled()) {
    for (at::TensorList list : {grads, weights_sn})
      for (const auto& t : list)
        TORCH_CHECK(!t.requires_grad(),
                    "sn_ext::spectral_normalize_grouped_backward is not differentiable: "
                    "differentiate through spectral_normalize_backward, layer by layer");
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grads, weights_sn, us, vs, sigmas, dims);
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, Autograd, m) {
  m.impl("spectral_normalize_", forward_kernel(&compiled_ops));
  m.impl("spectral_normalize_backward", backward_kernel(&compiled_ops));
  m.impl("spectral_normalize_scaled_backward", scaled_backward_kernel(&compiled_ops));
  m.impl("spectral_normalize_grouped_", &spectral_normalize_grouped_autograd);
  m.impl("spectral_normalize_grouped_backward", &spectral_normalize_grouped_backward_autograd);
}

void register_autograd(const std::string& forward, const std::string& backward, const std::string& scaled_backward) {
  // Never freed, see OpSet.
  const auto* ops = new OpSet("sn_ext::" + forward, "sn_ext::" + backward, "sn_ext::" + scaled_backward);
  // Never freed either: the registrations last as long as the process (a static Library would be destroyed at
  // exit, possibly after the dispatcher).
  auto* lib = new torch::Library(torch::Library::IMPL, "sn_ext", c10::DispatchKey::Autograd, __FILE__, __LINE__);
  lib->impl(forward.c_str(), forward_kernel(ops));
  lib->impl(backward.c_str(), backward_kernel(ops));
  lib->impl(scaled_backward.c_str(), scaled_backward_kernel(ops));
}

}  // namespace sn_ext
