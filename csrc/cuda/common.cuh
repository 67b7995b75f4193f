// The CUDA kernels' shared device code and launching (spectral_normalize_cuda.cu, spectral_normalize_backward_cuda.cu):
// every op, per layer or grouped, is one persistent kernel. Each phase is a __device__ function of its block
// coordinates that assumes a 1-D block of kThreads threads; the kernel walks a phase's virtual blocks, and runs its
// phases in one launch separated by barriers or, phased, one launch per phase (launch_steps). The phases themselves:
// fused_round.cuh (the default power iteration), split_round.cuh (SN_EXT_CUDA_ROUND=split, split-scalar),
// elementwise.cuh (W / sigma, the backward); their plans: block_walk.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../matrix_view.h"
#include "block_walk.h"
#include "kernels.h"
#include "launch.h"

namespace sn_ext {
namespace {

// Threads per block, for every phase (block_walk.h); kTargetBlocks: about how many blocks a phase of one layer
// should have (block_walk.h).
using block_walk::ceil_div;
using block_walk::kTargetBlocks;
using block_walk::kThreads;
using block_walk::pow2_at_least;
// Blocks per SM the kernels are compiled for (__launch_bounds__): at most 65536 / (2 * 256) = 128 registers per
// thread. Three (80 registers) left no room for what a thread keeps in flight: the fused pass's two rows of 64 bytes
// each, the element-wise passes' four 16-byte packs per tensor; ptxas spilled (tests/test_cuda_sass.py checks that
// nothing does). Two blocks of 256 threads with 128 bytes in flight each keep 64 KB per SM in flight, more than the
// three did with 64.
constexpr int kMinBlocksPerSm = 2;
// Layers per launch. Their plans travel as one kernel parameter: a per-layer op passes one layer (a few hundred
// bytes), a grouped op up to kGroupLayers per launch, a parameter block under 4 KB (static_asserts in the kernel
// files): the limit every launch path has always accepted (CUDA 12.1 raised it to 32 KB for ordinary launches, and
// nothing documents the larger blocks for cooperative ones). A larger group takes one launch per kGroupLayers.
constexpr int kGroupLayers = 12;
constexpr size_t kMaxParameterBytes = 4096;
// The split round's size classes (SN_EXT_CUDA_ROUND=split, split-scalar: the earlier kernels' launch plan, kept with
// them): a launch whose layers have at most kOneBlockMaxNumel elements in all runs in one block, its phases
// separated by __syncthreads; a larger one on a grid of kElementsPerThread elements per thread at most. The fused
// round and the backward choose per layer instead (block_walk.h: dense layers).
constexpr int64_t kOneBlockMaxNumel = int64_t(1) << 16;
constexpr int64_t kElementsPerThread = 8;

// A weight-shaped tensor as (outer, rows, inner) with its strides: Wm[i, o * inner + r] = W3[o][i][r].
struct View3d {
  int64_t outer, rows, inner;
  int64_t s_outer, s_row, s_inner;
  __host__ __device__ int64_t cols() const { return outer * inner; }
  __host__ __device__ int64_t offset(int64_t o, int64_t i, int64_t r) const {
    return o * s_outer + i * s_row + r * s_inner;
  }
};

View3d view_of(const at::Tensor& t3) {
  return {t3.size(0), t3.size(1), t3.size(2), t3.stride(0), t3.stride(1), t3.stride(2)};
}

// 16 bytes of a contiguous, 16-byte aligned tensor: one LDG.E.128 / STG.E.128.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t val[kSize];
};

// A layer's vectors in a forward.
template <typename scalar_t>
struct Vectors {
  // The caller's u (rows,), stride u_stride, and v (cols,): read, and written only where the layer's Finish commits
  // (kCommit, kBoth).
  scalar_t* u_in;
  int64_t u_stride;
  scalar_t* v_in;
  int64_t v_stride;
  scalar_t* u_work;  // contiguous (rows,): the rounds' u, in the weight's dtype like torch's buffers
  scalar_t* v_work;  // contiguous (cols,)
  int64_t rows, cols;
};

// ---------------------------------------------------------------------------------------------------------------
// Reductions inside a block (fixed shuffle and tree patterns: deterministic for a given block size)

// Sum over aligned groups of `width` lanes (a power of 2 <= 32); the total lands in each group's first lane.
// Every lane of the warp must call it.
template <typename T>
__device__ __forceinline__ T group_sum(T value, int width) {
  for (int offset = width / 2; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset, width);
  return value;
}

// Sum over the whole (1-D) block, returned to every thread. `scratch` holds 32 values; every thread must call it.
template <typename T>
__device__ T block_sum(T value, T* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  value = group_sum(value, 32);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < warps ? scratch[lane] : T(0);
    value = group_sum(value, 32);
    if (lane == 0) scratch[0] = value;
  }
  __syncthreads();
  value = scratch[0];
  __syncthreads();  // scratch may be reused by the caller
  return value;
}

// value(j) for j in [0, count) added in a fixed order (thread t adds t, t + blockDim.x, ..., then block_sum), returned
// to every thread: every block that calls it on the same values gets the same bits (lambda's total; the fused round's
// norms, computed by every block that needs them instead of by one block and a barrier). Every thread must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t* ordered_sum_scratch() {  // one buffer per sum type, not per caller's `value`
  __shared__ acc_t scratch[32];
  return scratch;
}

template <typename Value>
__device__ auto ordered_sum_block(int64_t count, const Value& value) {
  using acc_t = decltype(value(int64_t{0}));
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) sum += value(j);
  return block_sum(sum, ordered_sum_scratch<acc_t>());
}

// Two sums at once, a and b, as block_sum would add each (the same operations in the same order: the same bits),
// with one set of barriers.
template <typename T>
__device__ void block_sum2(T& a, T& b) {
  __shared__ T scratch[2][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  a = group_sum(a, 32);
  b = group_sum(b, 32);
  if (lane == 0) {
    scratch[0][warp] = a;
    scratch[1][warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = group_sum(lane < warps ? scratch[0][lane] : T(0), 32);
    b = group_sum(lane < warps ? scratch[1][lane] : T(0), 32);
    if (lane == 0) {
      scratch[0][0] = a;
      scratch[1][0] = b;
    }
  }
  __syncthreads();
  a = scratch[0][0];
  b = scratch[1][0];
  __syncthreads();
}

// ordered_sum_block of two lists at once (counts a_count, b_count; 0 for none): a and b, each with the bits
// ordered_sum_block would give it.
template <typename A, typename B, typename acc_t>
__device__ void ordered_sum2_block(int64_t a_count, const A& a_value, int64_t b_count, const B& b_value, acc_t& a,
                                   acc_t& b) {
  a = 0;
  b = 0;
  for (int64_t j = threadIdx.x; j < a_count; j += blockDim.x) a += a_value(j);
  for (int64_t j = threadIdx.x; j < b_count; j += blockDim.x) b += b_value(j);
  block_sum2(a, b);
}

template <typename acc_t>
__device__ __forceinline__ bool usable(acc_t norm) {
  return isfinite(norm) && norm > acc_t(0);
}

// The denominator of a normalization: max(norm, eps), but not fmax: a NaN norm must stay NaN, as std::max(norm, eps)
// on the CPU.
template <typename acc_t>
__device__ __forceinline__ acc_t norm_denominator(acc_t norm, acc_t eps) {
  return norm < eps ? eps : norm;
}

// The barrier between two phases of one launch: the whole grid's (a cooperative launch), or only the block's when
// the launch has one block (__syncthreads also makes the block's global-memory writes visible to the block).
__device__ __forceinline__ void phase_barrier(bool one_block) {
  if (one_block) {
    __syncthreads();
  } else {
    cooperative_groups::this_grid().sync();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// A launch's layers

// threadIdx.x, read where it is used (volatile: never hoisted). What the phases compute from it (a thread's columns,
// positions, offsets) then stays inside the phase: hoisted out of a kernel's loop over its phases, it was kept live
// through all of them, in registers the phases' own loops need (ptxas spilled).
__device__ __forceinline__ int thread_x() {
  int x;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(x));
  return x;
}

// Every phase's walk over its virtual blocks: layer l has blocks_of(layers[l]) of them, and this block takes b =
// blockIdx.x, + gridDim.x, ... (block_walk::walk_virtual_blocks, whose index math csrc/tests/test_block_walk.cpp
// checks on the CPU), calling body(layer, local) with local the block's index within its layer; `reversed` walks
// the same blocks last first. A body that uses shared memory ends with __syncthreads: the next virtual block reuses
// it.
template <typename Layer, typename Count, typename Body>
__device__ __forceinline__ void for_each_virtual_block(const Layer* layers, int count, const Count& blocks_of,
                                                       bool reversed, const Body& body) {
  block_walk::walk_virtual_blocks(layers, count, blocks_of, blockIdx.x, gridDim.x, reversed, body);
}

// A phase's per-layer setup, once per layer and block: body(layer, local, setup) where setup = make(layer), made
// again only when the walk reaches another layer (every thread must call make: it may sum over the block). The setup
// is the same in every thread and kept in shared memory, read where the body uses it: registers across the whole
// body would be registers its loops lack.
template <typename Setup>
__device__ __forceinline__ Setup& phase_setup() {
  __shared__ Setup setup;
  return setup;
}

template <typename Layer, typename Count, typename Make, typename Body>
__device__ __forceinline__ void for_each_virtual_block_of_layers(const Layer* layers, int count, const Count& blocks_of,
                                                                 bool reversed, const Make& make, const Body& body) {
  using Setup = decltype(make(layers[0]));
  Setup& setup = phase_setup<Setup>();
  const Layer* current = nullptr;
  for_each_virtual_block(layers, count, blocks_of, reversed, [&](const Layer& L, int64_t local) {
    if (&L != current) {
      const Setup made = make(L);
      __syncthreads();  // the previous layer's setup has been read
      if (threadIdx.x == 0) setup = made;
      __syncthreads();
      current = &L;
    }
    body(L, local, static_cast<const Setup&>(setup));
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Host side: launch plans.

// The current device's SM count, looked up once per device (a device attribute query: no synchronization).
int64_t multiprocessor_count() {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};
  const c10::DeviceIndex device = c10::cuda::current_device();
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// W / sigma's virtual blocks in the split round (each a piece of the elements; no sum, so the split may depend on the
// device): enough resident threads to saturate memory.
int elementwise_blocks(int64_t numel) {
  const int64_t max_blocks = multiprocessor_count() * (2048 / kThreads);
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(numel, kThreads), max_blocks)));
}

// Whether a weight-shaped (outer, rows, inner) view is contiguous (element e at offset e) and 16-byte aligned: what
// the packed paths of the element-wise passes need.
inline bool packable(const at::Tensor& t3) {
  const int64_t outer = t3.size(0), rows = t3.size(1), inner = t3.size(2);
  const bool contiguous = (inner == 1 || t3.stride(2) == 1) && (rows == 1 || t3.stride(1) == inner) &&
                          (outer == 1 || t3.stride(0) == rows * inner);
  return contiguous && reinterpret_cast<uintptr_t>(t3.const_data_ptr()) % 16 == 0;
}

// Whether the split round (matvec_block, rmatvec_block) can read W's rows in 16-byte packs: column c of row i at
// offset i * s_row + c, rows and the data 16-byte aligned, and cols a whole number of packs.
inline bool rows_packable(const at::Tensor& t3) {
  const int64_t outer = t3.size(0), inner = t3.size(2), pack = 16 / t3.element_size();
  const bool row_contiguous = (inner == 1 || t3.stride(2) == 1) && (outer == 1 || t3.stride(0) == inner);
  return row_contiguous && (outer * inner) % pack == 0 && (t3.size(1) == 1 || t3.stride(1) % pack == 0) &&
         reinterpret_cast<uintptr_t>(t3.const_data_ptr()) % 16 == 0;
}

// Whether the fused round (fused_round.cuh) can read W's rows in 16-byte packs: each thread's run of a row (its
// block_walk::kFusedBytes of op-math sums' worth of adjacent columns) contiguous and 16-byte aligned. Rows whose
// columns are contiguous (rows_packable), or, for a weight seen through dim > 0 (outer > 1, a ConvTranspose's
// in-channels), lines of inner contiguous elements that hold whole runs: column c at (c / inner) * s_outer + c % inner.
inline bool fused_packable(const at::Tensor& t3) {
  const int64_t outer = t3.size(0), rows = t3.size(1), inner = t3.size(2), pack = 16 / t3.element_size();
  const int64_t run = block_walk::kFusedBytes / (t3.element_size() == 8 ? 8 : 4);
  const bool lines = t3.stride(2) == 1 && inner % run == 0 && (outer == 1 || t3.stride(0) % pack == 0) &&
                     (rows == 1 || t3.stride(1) % pack == 0) &&
                     reinterpret_cast<uintptr_t>(t3.const_data_ptr()) % 16 == 0;
  return rows_packable(t3) || lines;
}

// Calls f(std::integral_constant<int, kLayers>{}): the launch structs' capacity, 1 for a single layer (a small
// parameter block), kGroupLayers for a group.
template <typename F>
void with_layer_capacity(size_t layers, const F& f) {
  if (layers == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, kGroupLayers>{});
  }
}

template <typename F>
void with_index_type(int64_t numel, const F& f) {
  if (numel <= std::numeric_limits<int32_t>::max()) {
    f(uint32_t{0});
  } else {
    f(uint64_t{0});
  }
}

// Launching (a cooperative launch's grid-wide barriers need every block resident)

// How many blocks of `kernel` fit on the current device at once (a cooperative launch must not ask for more),
// looked up once per kernel and device.
template <auto kernel>
int64_t resident_blocks() {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};
  const c10::DeviceIndex device = c10::cuda::current_device();
  int per_sm = cache[device].load(std::memory_order_relaxed);
  if (per_sm == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    TORCH_CHECK(per_sm > 0, "sn_ext: the CUDA kernel cannot be resident on this device");
    cache[device].store(per_sm, std::memory_order_relaxed);
  }
  return per_sm * multiprocessor_count();
}

// How many blocks a launch of `kernel` gets whose largest phase has `wanted` virtual blocks: as many, or what fits on
// the device at once.
template <auto kernel>
int64_t grid_blocks(int64_t wanted) {
  return std::max<int64_t>(1, std::min(wanted, resident_blocks<kernel>()));
}

// The split round's (see kOneBlockMaxNumel), for layers of `numel` elements in all.
template <auto kernel>
int64_t split_launch_blocks(int64_t numel, int64_t wanted) {
  if (numel <= kOneBlockMaxNumel) return 1;
  return std::min(grid_blocks<kernel>(wanted), std::max<int64_t>(1, ceil_div(numel, kThreads * kElementsPerThread)));
}

// Runs the `steps` phases of kernel(p) on the current stream. One block, or blocks that each work alone
// (`independent`: dense layers only), or one phase: one ordinary launch of them all, __syncthreads between phases.
// More: one cooperative launch whose blocks wait for each other between phases, or, when the launch mode says so
// (launch.h) or the cooperative launch is refused, one ordinary launch per phase, stream order standing for the
// barriers. The kernels read p.first_step, p.step_count and p.one_block (__syncthreads for the barriers); the
// parameter block is copied at each launch.
template <auto kernel, typename Params>
void launch_steps(Params& p, int64_t steps, int64_t blocks, bool independent = false) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const c10::DeviceIndex device = c10::cuda::current_device();
  const void* function = reinterpret_cast<const void*>(kernel);
  void* args[] = {&p};
  const dim3 grid(static_cast<unsigned>(blocks)), block(kThreads);
  p.one_block = blocks == 1 || independent;
  p.first_step = 0;
  p.step_count = steps;
  if (p.one_block || steps == 1) {
    C10_CUDA_CHECK(cudaLaunchKernel(function, grid, block, args, 0, stream));
    return;
  }
  if (launch_mode(device, stream) == LaunchMode::kCooperative) {
    const cudaError_t error = cudaLaunchCooperativeKernel(function, grid, block, args, 0, stream);
    if (error == cudaSuccess) {
      cooperative_succeeded(device);  // proves the device: launch_mode may choose it inside a capture from now on
      return;
    }
    if (!is_cooperative_refusal(error)) C10_CUDA_CHECK(error);
    (void)cudaGetLastError();  // clears the refusal, which the next CUDA error check would report
    cooperative_refused(device, error);
  }
  p.step_count = 1;
  for (p.first_step = 0; p.first_step < steps; ++p.first_step) {
    C10_CUDA_CHECK(cudaLaunchKernel(function, grid, block, args, 0, stream));
  }
}

}  // namespace
}  // namespace sn_ext
