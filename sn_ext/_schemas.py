"""The operator schemas, as csrc/sn_ext.cpp defines them.

The compiled library defines them in C++; when it is absent or disabled, the fallback defines them from here.
tests/test_schemas.py fails if the two copies drift apart. Every backend's set of ops (sn_ext.backends) has the
schemas of spectral_normalize_, spectral_normalize_backward and spectral_normalize_scaled_backward.
"""

NAMESPACE = "sn_ext"

SCHEMAS = {
    "power_iteration_": (
        "(Tensor weight, Tensor(a!) u, Tensor(b!) v, int dim, int n_power_iterations, float eps, "
        "bool v_first=False) -> Tensor"
    ),
    "spectral_normalize_": (
        "(Tensor weight, Tensor(a!) u, Tensor(b!) v, int dim, int n_power_iterations, float eps, "
        "bool v_first=False, float? coeff=None, Tensor? gamma=None, bool sigma_grad=True) "
        "-> (Tensor weight_sn, Tensor sigma, Tensor u_used, Tensor v_used)"
    ),
    "spectral_normalize_backward": (
        "(Tensor grad, Tensor weight_sn, Tensor u, Tensor v, Tensor sigma, int dim) -> Tensor"
    ),
    "spectral_normalize_scaled_backward": (
        "(Tensor grad, Tensor weight, Tensor u, Tensor v, Tensor sigma, int dim, float? coeff=None, "
        "Tensor? gamma=None, bool sigma_grad=True) -> (Tensor grad_weight, Tensor grad_gamma)"
    ),
    "spectral_normalize_grouped_": (
        "(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, int[] dims, int n_power_iterations, float eps, "
        "bool[]? v_first=None, float[]? coeffs=None, Tensor[]? gammas=None, bool[]? sigma_grad=None) "
        "-> (Tensor[] weights_sn, Tensor sigmas, Tensor[] us_used, Tensor[] vs_used)"
    ),
    "spectral_normalize_grouped_backward": (
        "(Tensor[] grads, Tensor[] weights_sn, Tensor[] us, Tensor[] vs, Tensor sigmas, int[] dims) -> Tensor[]"
    ),
}
