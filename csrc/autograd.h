// The autograd formulas of csrc/autograd.cpp, for ops defined outside this library.
#pragma once

#include <string>

namespace sn_ext {

// Registers csrc/autograd.cpp's formulas as the Autograd kernels of a backend's set of ops, named in the sn_ext
// namespace: `forward` with spectral_normalize_'s schema (u, v updated in place), `backward` and `scaled_backward`
// with spectral_normalize_backward's and spectral_normalize_scaled_backward's, which the forward's backward calls
// (sn_ext/_autograd.py register_ops: the Triton and reference backends). Replaces any Autograd kernel they had; the
// ops may be defined later, but must be by the first call.
void register_autograd(const std::string& forward, const std::string& backward, const std::string& scaled_backward);

}  // namespace sn_ext
