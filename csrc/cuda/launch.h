// How the CUDA kernels are launched: one cooperative launch per op (the persistent kernel and its grid-wide
// barriers), or one ordinary launch per phase ("phased": the same __device__ phase code, stream order in place of
// the barriers, bit-identical results). A cooperative launch can be refused where an ordinary one is not (MPS with
// an active-thread limit, green contexts, other resident kernels such as NCCL's): then "auto" remembers the refusal
// for the device, warns once and runs phased from then on.
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime_api.h>

#include <string>

namespace sn_ext {

enum class LaunchMode { kCooperative, kPhased };

// The environment variable that chooses: auto (default), cooperative or phased. Read at every launch, so a test
// or a user can switch in-process.
constexpr const char* kLaunchModeEnv = "SN_EXT_CUDA_LAUNCH";

// The mode for a launch on `device` into `stream`: SN_EXT_CUDA_LAUNCH's choice, where "auto" is cooperative unless
// the device cannot launch cooperatively or refused it before. While `stream` is being captured into a CUDA graph,
// "auto" is cooperative only once a cooperative launch has succeeded on the device outside a capture: a refusal
// inside a capture would invalidate the whole capture before the phased launches could stand in, so nothing that
// can be refused is attempted there (torch's capture protocol runs the step eagerly first, which proves it). Raises
// on any other value of the variable, naming it, and where "cooperative" is forced on a device that has no
// cooperative launch.
LaunchMode launch_mode(c10::DeviceIndex device, cudaStream_t stream);

// A cooperative launch on `device` succeeded outside a capture (launch_mode may choose it inside one from now on).
void cooperative_succeeded(c10::DeviceIndex device);

// Whether `error`, returned by cudaLaunchCooperativeKernel, means "not as a cooperative launch" (try phased) rather
// than a bug or a broken device.
bool is_cooperative_refusal(cudaError_t error);

// A cooperative launch on `device` was refused with `error`: under "auto", remembered for the device with a warning
// (once per process); under "cooperative", an error that says so.
void cooperative_refused(c10::DeviceIndex device, cudaError_t error);

// What runs on `device`, in words, for `python -m sn_ext.info`: "cooperative", "phased (SN_EXT_CUDA_LAUNCH=phased)",
// "phased (cooperative launch refused: ...)", ..., then the round mode: "; u-first rounds fused (SN_EXT_CUDA_ROUND)".
std::string launch_mode_description(c10::DeviceIndex device);

// How a u-first power-iteration round reads W: "fused" (default), W v and W^T (W v) in one pass over W by blocks that
// own whole rows (the CPU kernel's matvec_and_gram), or "split", the earlier path: W v, u = N(.), W^T u, v = N(.),
// each product its own pass, its loops reading W in 16-byte packs where the rows allow, several loads in flight; or
// "split-scalar", the split round with the scalar loops it had before (one element in flight per thread). The
// v-first (legacy) round is always split: its loops are the scalar ones under split-scalar only. The three agree to
// float rounding, not bit for bit (the sums run in other orders). A switch so that the first GPU run can check each
// against the CPU kernels, in this order, and run everything after with the first that passes
// (benchmarks/gpu_check.sh): none of the fused round or the packed split loops had run on a GPU when written.
enum class RoundMode { kFused, kSplit, kSplitScalar };

// The environment variable that chooses: fused (default; also when unset or empty), split or split-scalar. Read at
// every launch.
constexpr const char* kRoundModeEnv = "SN_EXT_CUDA_ROUND";

// SN_EXT_CUDA_ROUND's choice; raises on any other value, naming the variable.
RoundMode round_mode();

}  // namespace sn_ext
