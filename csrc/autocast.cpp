// Autocast for the sn_ext ops: they run in their inputs' dtype (the weight's, whatever the autocast dtype), with
// autocast off inside them, as torch's own fp32-list ops do. A custom op with no Autocast kernel falls through that
// key with autocast still on, so every aten op its kernel calls is autocast: the pure-PyTorch reference (the kernel
// of every device without a compiled one) then multiplied in bfloat16/float16 and returned a bfloat16 sigma where
// the schema's fake kernel promises float32. The fused kernels call no such op; this makes every backend behave as
// they do. (sn_ext/ops.py registers the same in Python when the compiled library is absent.)
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace sn_ext {
namespace {

void call_without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

}  // namespace

#define SN_EXT_WITHOUT_AUTOCAST(key)                                                                                   \
  TORCH_LIBRARY_IMPL(sn_ext, key, m) {                                                                                 \
    m.impl("power_iteration_", torch::CppFunction::makeFromBoxedFunction<&call_without_autocast>());                   \
    m.impl("spectral_normalize_", torch::CppFunction::makeFromBoxedFunction<&call_without_autocast>());                \
    m.impl("spectral_normalize_backward", torch::CppFunction::makeFromBoxedFunction<&call_without_autocast>());        \
    m.impl("spectral_normalize_scaled_backward", torch::CppFunction::makeFromBoxedFunction<&call_without_autocast>()); \
    m.impl("spectral_normalize_grouped_", torch::CppFunction::makeFromBoxedFunction<&call_without_autocast>());        \
    m.impl("spectral_normalize_grouped_backward",                                                                      \
           torch::CppFunction::makeFromBoxedFunction<&call_without_autocast>());                                       \
  }

SN_EXT_WITHOUT_AUTOCAST(AutocastCPU)
SN_EXT_WITHOUT_AUTOCAST(AutocastCUDA)

}  // namespace sn_ext
