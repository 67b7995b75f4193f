// The launch mode of the CUDA kernels (launch.h): SN_EXT_CUDA_LAUNCH, and the devices that refused a cooperative
// launch.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "launch.h"

namespace sn_ext {
namespace {

enum class Requested { kAuto, kCooperative, kPhased };

Requested requested_mode() {
  const char* value = std::getenv(kLaunchModeEnv);
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "auto") == 0) return Requested::kAuto;
  if (std::strcmp(value, "cooperative") == 0) return Requested::kCooperative;
  if (std::strcmp(value, "phased") == 0) return Requested::kPhased;
  TORCH_CHECK(false, "sn_ext: ", kLaunchModeEnv, " must be auto, cooperative or phased, not '", value, "'");
}

// Per device: 0 = not looked at yet, 1 = cooperative launches possible, 2 = the device has no cooperative launch,
// 3 = a cooperative launch was refused (reason in refusals[device]), 4 = possible and one succeeded outside a capture.
enum State : int { kUnknown = 0, kCapable = 1, kIncapable = 2, kRefused = 3, kProven = 4 };
std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> states{};
std::array<std::string, C10_COMPILE_TIME_MAX_GPUS> refusals;
std::mutex refusals_mutex;

State state_of(c10::DeviceIndex device) {
  int state = states[device].load(std::memory_order_acquire);
  if (state == kUnknown) {
    int capable = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&capable, cudaDevAttrCooperativeLaunch, device));
    int expected = kUnknown;
    states[device].compare_exchange_strong(expected, capable ? kCapable : kIncapable, std::memory_order_acq_rel);
    state = states[device].load(std::memory_order_acquire);
  }
  return static_cast<State>(state);
}

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace

LaunchMode launch_mode(c10::DeviceIndex device, cudaStream_t stream) {
  switch (requested_mode()) {
    case Requested::kPhased:
      return LaunchMode::kPhased;
    case Requested::kCooperative:
      TORCH_CHECK(state_of(device) != kIncapable, "sn_ext: ", kLaunchModeEnv,
                  "=cooperative, but cuda:", static_cast<int>(device),
                  " has no cooperative launch (cudaDevAttrCooperativeLaunch is 0): set it to auto or phased");
      return LaunchMode::kCooperative;
    case Requested::kAuto:
      break;
  }
  const State state = state_of(device);
  if (state == kProven) return LaunchMode::kCooperative;
  return state == kCapable && !is_capturing(stream) ? LaunchMode::kCooperative : LaunchMode::kPhased;
}

void cooperative_succeeded(c10::DeviceIndex device) {
  if (states[device].load(std::memory_order_relaxed) != kCapable) return;  // proven already: no write per launch
  int expected = kCapable;
  states[device].compare_exchange_strong(expected, kProven, std::memory_order_acq_rel);
}

bool is_cooperative_refusal(cudaError_t error) {
  return error == cudaErrorCooperativeLaunchTooLarge || error == cudaErrorNotSupported ||
         error == cudaErrorNotPermitted || error == cudaErrorLaunchOutOfResources;
}

void cooperative_refused(c10::DeviceIndex device, cudaError_t error) {
  const std::string reason = std::string(cudaGetErrorName(error)) + ": " + cudaGetErrorString(error);
  TORCH_CHECK(requested_mode() != Requested::kCooperative,
              "sn_ext: the cooperative launch was refused on cuda:", static_cast<int>(device), " (", reason, ") and ",
              kLaunchModeEnv,
              "=cooperative; unset it (or set it to auto or phased) to run one ordinary launch per phase instead");
  {
    const std::lock_guard<std::mutex> lock(refusals_mutex);
    refusals[device] = reason;
  }
  states[device].store(kRefused, std::memory_order_release);
  TORCH_WARN_ONCE("sn_ext: a cooperative launch was refused on cuda:", static_cast<int>(device), " (", reason,
                  "); the CUDA kernels run one ordinary launch per phase there from now on (same results; set ",
                  kLaunchModeEnv, "=phased to choose it from the start)");
}

RoundMode round_mode() {
  const char* value = std::getenv(kRoundModeEnv);
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "fused") == 0) return RoundMode::kFused;
  if (std::strcmp(value, "split") == 0) return RoundMode::kSplit;
  if (std::strcmp(value, "split-scalar") == 0) return RoundMode::kSplitScalar;
  TORCH_CHECK(false, "sn_ext: ", kRoundModeEnv, " must be fused, split or split-scalar, not '", value, "'");
}

namespace {

std::string launch_description(c10::DeviceIndex device) {
  switch (requested_mode()) {
    case Requested::kPhased:
      return std::string("phased (") + kLaunchModeEnv + "=phased)";
    case Requested::kCooperative:
      return std::string("cooperative (") + kLaunchModeEnv + "=cooperative)";
    case Requested::kAuto:
      break;
  }
  switch (state_of(device)) {
    case kCapable:
      return "cooperative (phased inside a CUDA-graph capture until one has succeeded outside)";
    case kProven:
      return "cooperative";
    case kIncapable:
      return "phased (the device has no cooperative launch)";
    default: {
      const std::lock_guard<std::mutex> lock(refusals_mutex);
      return "phased (a cooperative launch was refused: " + refusals[device] + ")";
    }
  }
}

}  // namespace

std::string launch_mode_description(c10::DeviceIndex device) {
  const RoundMode mode = round_mode();
  const char* round = mode == RoundMode::kFused ? "fused" : mode == RoundMode::kSplit ? "split" : "split-scalar";
  return launch_description(device) + "; u-first rounds " + round + " (" + kRoundModeEnv + ")";
}

}  // namespace sn_ext
