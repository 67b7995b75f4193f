// sn_ext::spectral_normalize on CUDA, and the design of the CUDA kernels: the semantics of the CPU kernels (csrc/cpu,
// the reference), on the GPU.
//
// ONE launch per op, for one layer or for a whole group of layers (sn_ext.grouped_spectral_norm; phased: one per
// phase):
//   spectral_normalize, power_iteration_, spectral_normalize_grouped_  -> forward_kernel
//   spectral_normalize_backward, spectral_normalize_grouped_backward   -> backward_kernel
// Each is a persistent kernel started with a cooperative launch, so that all its blocks are resident at once and may
// wait for each other at a grid-wide barrier, or, where it has one phase, an ordinary launch. Between barriers, the
// blocks walk the "virtual blocks" of one phase for all the layers of the launch (the plans of block_walk.h, the
// __device__ phase functions of fused_round.cuh, split_round.cuh and elementwise.cuh):
//
//   forward, fused rounds (SN_EXT_CUDA_ROUND=fused, the default; fused_round.cuh), u-first and v-first (legacy):
//                                  [pass over W: y = W x, z = W^T y in one read | z summed] per round | u, v
//                                  normalized, sigma, W / sigma      -> 2n + 1 phases (v-first 2n + 2; n = 0: 2)
//            dense layers (a whole layer in one block, chosen per shape by the device-time model): every phase in
//                                  the launch's first, no grid-wide barrier
//   forward, split rounds (split, split-scalar; split_round.cuh): W v | u = N(.) (one block per layer) | W^T u |
//                                  v = N(.), sigma (v-first: W^T u first) per round | W / sigma -> 4n + 1 phases
//   backward:                      <G, W_sn> partial sums | lambda (each block adds the partial sums itself) and
//                                  (G - lambda u v^T) / sigma  -> 2 phases (dense layers: 1)
//
// The fused round is the CPU kernel's matvec_and_gram: it reads W once per round, so that a forward with n = 1
// reads W twice and writes W_sn once, the minimum (7 weight-sized passes per train step with the backward's 4). Rows
// wider than what a block holds in registers (4096 float32 columns) take a second read of the block's rows, from
// L1/L2. The split round reads W twice per round; it stays as the fallback that benchmarks/gpu_check.sh switches to
// if the fused round fails its first GPU check.
//
// Why W is otherwise read from device memory in every phase rather than kept on chip across them: a GAN
// discriminator's weights, a few MB to tens of MB, stay in the 50-60 MB L2 of an H100/H200 between the phases of one
// launch, and a phase that re-reads what the one before read walks back over it (the data read last first). What the
// single launch removes is the per-launch cost that dominates spectral norm at these sizes (torch: ~26 launches per
// layer per step).
//
// Everything stays on the device: sigma, the "a round met a degenerate vector" flags and lambda are device values,
// never copied to the host, so the ops never synchronize and can be captured in a CUDA graph.
//
// Reductions are deterministic: every sum is split into pieces fixed by the shape alone (not by the device, the
// grid size or timing) and combined in a fixed order; no floating-point atomics. The same inputs give the same bits,
// and a layer gives the same bits alone or in a group, cooperative or phased.
//
// Sums accumulate in at::opmath_type<scalar_t> (float for float16/bfloat16/float32, double for float64), which is
// also sigma's dtype (sigma_dtype in matrix_view.h). The CPU kernels accumulate in double for every dtype, so
// float32 results agree with them to float32 rounding, not bit for bit.
//
// The layers' plans travel as one __grid_constant__ kernel parameter (read in place, never copied per thread), under
// 4 KB: one layer for a per-layer op, up to kGroupLayers for a grouped one (a larger group takes one launch per
// kGroupLayers layers).
//
// Launch modes (common.cuh: launch_steps; launch.h): a cooperative launch, or, where that is refused or
// SN_EXT_CUDA_LAUNCH=phased, one ordinary launch per phase. The phases' split into virtual blocks is the same in
// both, so are the result bits.
//
// Only c10's CUDA headers are used (c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream
// forwards to): ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers that a minimal CUDA toolkit lacks.
#include <optional>
#include <vector>

#include "common.cuh"
#include "elementwise.cuh"
#include "fused_round.cuh"
#include "kernels.h"
#include "scaled_form.cuh"
#include "split_round.cuh"

namespace sn_ext {
namespace {

// A layer's plans of the split round's phases (32-bit where the plan bounds them: kMaxGridY splits, int32 grid.x:
// finish_split).
struct SplitLayerPlan {
  int mv_lanes, rmv_lanes, mv_splits, rmv_splits, mv_blocks_x, rmv_blocks_x;
  int64_t mv_chunk, rmv_chunk, divide_blocks;
};

template <typename scalar_t, typename acc_t>
struct LayerForward {
  const scalar_t* w;
  View3d wv;
  scalar_t* out;  // W_sn through ov; nullptr for power_iteration_ (no division)
  View3d ov;
  Vectors<scalar_t> vec;
  Finish finish;  // what the last normalization does with the vectors (see Finish)
  bool v_first;   // the layer's power-iteration order (the fused round: each layer its own; split: the launch's)
  // The fused round: W's columns in memory order (a channels_last weight read in place), v's element of each.
  block_walk::ColumnOrder v_order;
  bool divide_packed;        // W and W_sn contiguous and aligned (packable)
  ScaledForm<acc_t> scaled;  // W_sn = W g / max(sigma, f) (scaled_form.cuh); the plain form's: W / sigma
  // The round reads W's rows in 16-byte packs: fused, fused_packable; split, rows_packable (false under
  // SN_EXT_CUDA_ROUND=split-scalar, which runs the scalar loops).
  bool rows_packed;
  // This layer's workspace: the fused round's (fused_workspace), or the split products' partial sums.
  acc_t* partial;
  // Two flags "a round met a degenerate vector": the split rounds use [0]; fused step s writes [s % 2] from the
  // previous step's [(s + 1) % 2], which the step's blocks read while one of them writes.
  int* degenerate;
  acc_t* sigma;
  int64_t numel;
  // The round's plan: the fused round's (block_walk::plan_fused) or the split round's (a launch runs one or the
  // other: one in place of the other, so that kGroupLayers layers stay under kMaxParameterBytes).
  union {
    FusedPlan fused;
    SplitLayerPlan split;
  };
};

// A forward launch's parameter block: up to kLayers layers (1 for a per-layer op, kGroupLayers for a grouped one).
template <typename scalar_t, typename acc_t, int kLayers>
struct ForwardLaunch {
  using scalar_type = scalar_t;
  using acc_type = acc_t;
  using Layer = LayerForward<scalar_t, acc_t>;
  Layer layers[kLayers];
  int count;
  int64_t n;
  acc_t eps;
  bool v_first;                    // the split round's order (one per launch)
  int64_t steps;                   // the fused round's phases: the most its layers' schedules take (layer_step)
  int64_t first_step, step_count;  // the phases this launch runs (launch_steps)
  bool one_block;  // each block works alone (one block, or dense layers only): __syncthreads between phases
};

static_assert(sizeof(ForwardLaunch<double, double, kGroupLayers>) <= kMaxParameterBytes,
              "a grouped forward launch's parameter block must stay under 4 KB");
static_assert(sizeof(ForwardLaunch<double, double, 1>) <= 512, "a per-layer forward launch passes a small block");

// ---------------------------------------------------------------------------------------------------------------
// The fused rounds (fused_round.cuh): a step's per-layer setup, and one virtual block of it.

// What a block finds of a layer once per step: the divisor of the pass's x (x = z / divisor) or of the sums
// (z = sums / divisor), or what the finish writes; the previous steps' degenerate flag and this step's own check.
template <typename acc_t>
struct StepSetup {
  acc_t divisor;
  Finishing<acc_t> finishing;
  int flag_in;
  bool bad;
};

template <typename Launch>
__device__ StepSetup<typename Launch::acc_type> fused_setup(const Launch& p, const typename Launch::Layer& L,
                                                            const FusedStep& step, int64_t s) {
  using acc_t = typename Launch::acc_type;
  StepSetup<acc_t> u{acc_t(1), {}, s > 0 ? L.degenerate[(s + 1) % 2] : 0, false};
  acc_t y = 0, z = 0;
  switch (step.phase) {
    case FusedPhase::kPass:
      if (!step.from_input) {  // x = N(z): |z| from the last sums' (or dense pass's) shares
        layer_square_sums(L, false, true, y, z);
        u.divisor = norm_denominator(sqrt(z), p.eps);
        u.bad = !usable(sqrt(z));
      }
      break;
    case FusedPhase::kSums:
      if (step.divide_y) {  // z = W^T y / max(|y|, eps)
        layer_square_sums(L, true, false, y, z);
        u.divisor = norm_denominator(sqrt(y), p.eps);
        u.bad = !usable(sqrt(y));
      }
      break;
    case FusedPhase::kFinish:
      if (step.dot) {  // n = 0: sigma = u . (W v)
        layer_square_sums(L, true, false, y, z);
        u.finishing = {acc_t(1), acc_t(1), y, false, false};
        break;
      }
      layer_square_sums(L, true, true, y, z);
      {
        const acc_t norm_u = sqrt(y), norm_v = sqrt(z);
        const acc_t u_divisor = norm_denominator(norm_u, p.eps), v_divisor = norm_denominator(norm_v, p.eps);
        // u-first: sigma = |W^T u|^2 / max(|W^T u|, eps); v-first (torch's legacy spectral_norm): u . W v =
        // |W v|^2 / max(|W v|, eps).
        const acc_t sigma = step.v_first ? norm_u * norm_u / u_divisor : norm_v * norm_v / v_divisor;
        const bool bad = u.flag_in != 0 || !usable(norm_u) || !usable(norm_v);
        u.finishing = {u_divisor, v_divisor, sigma, true, bad};
      }
      break;
  }
  return u;
}

template <typename Launch>
__device__ void fused_pass(const Launch& p, const typename Launch::Layer& L, const FusedStep& step,
                           const StepSetup<typename Launch::acc_type>& setup, int64_t local) {
  using scalar_t = typename Launch::scalar_type;
  using acc_t = typename Launch::acc_type;
  const bool weights = step.pass == Pass::kZ || step.dot;
  const PassInput<scalar_t, acc_t> in{
      step.from_input ? L.vec.v_in : nullptr, L.vec.v_stride, L.v_order, L.partial + L.wv.rows, setup.divisor,
      weights ? L.vec.u_in : nullptr,         L.vec.u_stride};
  if (L.rows_packed) {
    row_pass_block<true>(L, step.pass, in, step.dot, p.eps, local);
  } else {
    row_pass_block<false>(L, step.pass, in, step.dot, p.eps, local);
  }
}

// Virtual block `local` of layer L's step s (`step`, its setup made by fused_setup).
template <typename index_t, typename Launch>
__device__ __forceinline__ void fused_layer_step(const Launch& p, const typename Launch::Layer& L,
                                                 const FusedStep& step, int64_t s,
                                                 const StepSetup<typename Launch::acc_type>& setup, int64_t local) {
  using scalar_t = typename Launch::scalar_type;
  using acc_t = typename Launch::acc_type;
  switch (step.phase) {
    case FusedPhase::kPass:
      fused_pass(p, L, step, setup, local);
      break;
    case FusedPhase::kSums:
      column_sums_block<acc_t>(L, setup.divisor, local);
      break;
    case FusedPhase::kFinish:
      finish_block<scalar_t, acc_t, index_t>(L, setup.finishing, local);
      return;  // the last step: no flag to pass on
  }
  if (local == 0 && threadIdx.x == 0) L.degenerate[s % 2] = setup.flag_in | (setup.bad ? 1 : 0);
}

// Phase s of a fused launch: every layer's step of its own schedule (block_walk::layer_step: the spread layers'
// finishes all in the last phase, walking back over the blocks the pass walked), a spread layer's over many blocks, a
// dense layer's in one block (its schedule is shorter: it has no sums steps, and nothing to do once it is done).
template <typename Launch>
__device__ __forceinline__ int64_t step_in_phase(const Launch& p, const typename Launch::Layer& L, int s) {
  return block_walk::layer_step(s, p.steps, p.n, L.v_first, L.fused.dense());
}

template <typename index_t, typename Launch>
__device__ __forceinline__ void fused_phase(const Launch& p, int s) {
  using Layer = typename Launch::Layer;
  using acc_t = typename Launch::acc_type;
  const auto blocks_of = [&](const Layer& L) {
    return block_walk::phase_blocks(L.fused, step_in_phase(p, L, s), p.n, L.v_first, p.one_block);
  };
  for_each_virtual_block_of_layers(
      p.layers, p.count, blocks_of, s == p.steps - 1,
      [&](const Layer& L) {
        const int64_t t = step_in_phase(p, L, s);
        return t < 0 ? StepSetup<acc_t>{} : fused_setup(p, L, fused_step(t, p.n, L.v_first, L.fused.dense()), t);
      },
      [&](const Layer& L, int64_t local, const StepSetup<acc_t>& setup) {
        const int64_t t = step_in_phase(p, L, s);
        if (t >= 0) fused_layer_step<index_t>(p, L, fused_step(t, p.n, L.v_first, L.fused.dense()), t, setup, local);
      });
}

// ---------------------------------------------------------------------------------------------------------------
// The split rounds (split_round.cuh).

// The split forward's phases, in the order split_step lists them.
enum class SplitPhase : int { kMatvec, kRmatvec, kNormalizeU, kNormalizeV, kDot, kDivide };

struct SplitStep {
  SplitPhase phase;
  bool first;  // matvec / rmatvec: from the input vectors; normalize: the call's first half-step (starts the flag)
  bool last;   // normalize: the call's last half-step (writes sigma, finishes the vectors)
};

// The phases of n split rounds: n = 0 is W v then sigma = u^T (W v); a round is four phases (two matrix-vector
// products, each followed by its normalization), then W / sigma (except power_iteration_).
__host__ __device__ inline int64_t split_steps(int64_t n, bool divide) {
  return (n == 0 ? 2 : 4 * n) + (divide ? 1 : 0);
}

// Phase s of the split forward: u-first W v | u = N(.) | W^T u | v = N(.); v-first W^T u | v = N(.) | W v | u = N(.).
__device__ inline SplitStep split_step(int64_t s, int64_t n, bool v_first) {
  using P = SplitPhase;
  if (s >= (n == 0 ? 2 : 4 * n)) return {P::kDivide, false, false};
  if (n == 0) return {s == 0 ? P::kMatvec : P::kDot, true, false};
  const int64_t round = s / 4;
  const bool first = round == 0, last = round == n - 1;
  switch (s % 4) {
    case 0:
      return {v_first ? P::kRmatvec : P::kMatvec, first, false};
    case 1:
      return {v_first ? P::kNormalizeV : P::kNormalizeU, first, false};
    case 2:
      return {v_first ? P::kMatvec : P::kRmatvec, false, false};
    default:
      return {v_first ? P::kNormalizeU : P::kNormalizeV, false, last};
  }
}

// W x for every layer: x is the input v (`from_input`) or the round's v.
template <typename Launch>
__device__ void matvec_phase(const Launch& p, bool from_input) {
  using Layer = typename Launch::Layer;
  const auto blocks_of = [](const Layer& L) -> int64_t { return int64_t{L.split.mv_blocks_x} * L.split.mv_splits; };
  for_each_virtual_block(p.layers, p.count, blocks_of, false, [&](const Layer& L, int64_t local) {
    const MatvecArgs<typename Launch::scalar_type, typename Launch::acc_type> args{
        L.w,
        L.wv,
        from_input ? L.vec.v_in : L.vec.v_work,
        from_input ? L.vec.v_stride : 1,
        L.partial,
        L.split.mv_lanes,
        L.split.mv_chunk};
    matvec_block(args, L.rows_packed, local % L.split.mv_blocks_x, local / L.split.mv_blocks_x);
    __syncthreads();  // the next virtual block reuses this one's shared memory
  });
}

// W^T y for every layer: y is the input u (`from_input`) or the round's u.
template <typename Launch>
__device__ void rmatvec_phase(const Launch& p, bool from_input) {
  using Layer = typename Launch::Layer;
  const auto blocks_of = [](const Layer& L) -> int64_t { return int64_t{L.split.rmv_blocks_x} * L.split.rmv_splits; };
  for_each_virtual_block(p.layers, p.count, blocks_of, false, [&](const Layer& L, int64_t local) {
    const RmatvecArgs<typename Launch::scalar_type, typename Launch::acc_type> args{
        L.w,
        L.wv,
        from_input ? L.vec.u_in : L.vec.u_work,
        from_input ? L.vec.u_stride : 1,
        L.partial,
        L.split.rmv_lanes,
        L.split.rmv_chunk};
    rmatvec_block(args, L.rows_packed, local % L.split.rmv_blocks_x, local / L.split.rmv_blocks_x);
    __syncthreads();
  });
}

// u = N(W v) (`into_u`) or v = N(W^T u), one block per layer; the last half-step also writes sigma and finishes.
template <typename Launch>
__device__ void normalize_phase(const Launch& p, bool into_u, bool first, bool last) {
  for (int l = blockIdx.x; l < p.count; l += gridDim.x) {
    const typename Launch::Layer& L = p.layers[l];
    const NormalizeArgs<typename Launch::scalar_type, typename Launch::acc_type> args{
        L.partial,
        into_u ? L.wv.rows : L.wv.cols(),
        into_u ? L.split.mv_splits : L.split.rmv_splits,
        into_u ? L.vec.u_work : L.vec.v_work,
        p.eps,
        L.degenerate,
        first,
        last ? L.sigma : nullptr,
        last ? L.finish : Finish::kNone,
        L.vec};
    normalize_block(args);
    __syncthreads();
  }
}

// n == 0: sigma = u^T W v with the input vectors, which are also the returned ones; one block per layer.
template <typename Launch>
__device__ void dot_phase(const Launch& p) {
  for (int l = blockIdx.x; l < p.count; l += gridDim.x) {
    const typename Launch::Layer& L = p.layers[l];
    dot_block(L.partial, L.split.mv_splits, L.vec, L.sigma, L.finish != Finish::kCommit);
    __syncthreads();
  }
}

// W / sigma for every layer, each virtual block a piece of its elements.
template <typename index_t, typename Launch>
__device__ void divide_phase(const Launch& p) {
  using Layer = typename Launch::Layer;
  using scalar_t = typename Launch::scalar_type;
  const auto blocks_of = [](const Layer& L) -> int64_t { return L.out == nullptr ? 0 : L.split.divide_blocks; };
  for_each_virtual_block(p.layers, p.count, blocks_of, false, [&](const Layer& L, int64_t local) {
    const int64_t unit = L.divide_packed ? Pack<scalar_t>::kSize : 1;
    const block_walk::Range piece =
        block_walk::piece(L.numel, block_walk::piece_chunk(L.numel, L.split.divide_blocks, unit), local);
    divide_range<false, scalar_t, typename Launch::acc_type, index_t>(
        L.w, L.wv, L.out, L.ov, L.scaled.output_divisor(*L.sigma), L.divide_packed, piece.begin, piece.end);
  });
}

template <typename index_t, typename Launch>
__device__ __forceinline__ void split_phase(const Launch& p, int64_t s) {
  const SplitStep step = split_step(s, p.n, p.v_first);
  switch (step.phase) {
    case SplitPhase::kMatvec:
      matvec_phase(p, step.first);
      break;
    case SplitPhase::kRmatvec:
      rmatvec_phase(p, step.first);
      break;
    case SplitPhase::kNormalizeU:
      normalize_phase(p, true, step.first, step.last);
      break;
    case SplitPhase::kNormalizeV:
      normalize_phase(p, false, step.first, step.last);
      break;
    case SplitPhase::kDot:
      dot_phase(p);
      break;
    case SplitPhase::kDivide:
      divide_phase<index_t>(p);
      break;
  }
}

// One kernel for the fused rounds and one for the split ones (kFused), each without the other's code: together
// they took more registers than a thread has, and ptxas spilled.
template <typename scalar_t, typename acc_t, typename index_t, int kLayers, bool kFused>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    forward_kernel(const __grid_constant__ ForwardLaunch<scalar_t, acc_t, kLayers> p) {
  for (int s = static_cast<int>(p.first_step); s < p.first_step + p.step_count; ++s) {
    if (s > p.first_step) phase_barrier(p.one_block);
    if constexpr (kFused) {
      fused_phase<index_t>(p, s);
    } else {
      split_phase<index_t>(p, s);
    }
  }
}

}  // namespace

void run_forward(const std::vector<ForwardLayer>& layers, const at::Tensor& sigmas, int64_t n, double eps) {
  const at::Tensor& w0 = layers[0].w3;
  const auto acc_options = w0.options().dtype(sigmas.scalar_type());
  // A launch's rounds are all fused or all split, so a layer's bits are the same alone or in a group.
  const RoundMode mode = round_mode();
  const bool fused = mode == RoundMode::kFused;
  std::vector<SplitPlan> mv_plans, rmv_plans;
  std::vector<FusedPlan> fused_plans;
  std::vector<char> rows_packed;
  std::vector<int64_t> partial_offsets{0};
  int64_t max_numel = 0;
  for (const ForwardLayer& layer : layers) {
    const View3d view = view_of(layer.w3);
    if (fused) {
      rows_packed.push_back(fused_packable(layer.w3));
      fused_plans.push_back(block_walk::plan_fused(view.rows, view.cols(), static_cast<int>(layer.w3.element_size()),
                                                   rows_packed.back()));
      partial_offsets.push_back(partial_offsets.back() +
                                fused_workspace(view.rows, view.cols(), fused_plans.back()).size);
    } else {
      rows_packed.push_back(mode != RoundMode::kSplitScalar && rows_packable(layer.w3));
      const int64_t pack = rows_packed.back() ? 16 / layer.w3.element_size() : 1;
      mv_plans.push_back(plan_matvec(view, pack));
      rmv_plans.push_back(plan_rmatvec(view, pack));
      // The larger of the two products' partial sums (n == 0 uses the matvec's).
      partial_offsets.push_back(partial_offsets.back() +
                                std::max(mv_plans.back().splits * view.rows, rmv_plans.back().splits * view.cols()));
    }
    max_numel = std::max(max_numel, layer.w3.numel());
  }
  at::Tensor workspace = at::empty({partial_offsets.back()}, acc_options);
  // No memset: each layer's first step writes its flag instead of adding to it. Two per layer (LayerForward).
  at::Tensor degenerate = at::empty({2 * static_cast<int64_t>(layers.size())}, w0.options().dtype(at::kInt));
  // The layers in launch order: the fused round runs layers of both power-iteration orders in one launch (each its
  // own schedule), the split round one order per launch (u-first layers first). Each layer keeps its own place in
  // the workspace, flags and sigmas.
  std::vector<size_t> order;
  for (const bool v_first : {false, true})
    for (size_t i = 0; i < layers.size(); ++i)
      if (fused ? !v_first : layers[i].v_first == v_first) order.push_back(i);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w0.scalar_type(), "sn_ext_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(max_numel, [&](auto tag) {
      using index_t = decltype(tag);
      with_layer_capacity(layers.size(), [&](auto capacity) {
        constexpr int kLayers = decltype(capacity)::value;
        for (size_t start = 0, end = 0; start < order.size(); start = end) {
          const bool v_first = layers[order[start]].v_first;
          for (end = start; end < order.size() && end - start < kLayers; ++end)
            if (!fused && layers[order[end]].v_first != v_first) break;
          ForwardLaunch<scalar_t, acc_t, kLayers> p{};
          p.count = static_cast<int>(end - start);
          p.n = n;
          p.eps = static_cast<acc_t>(eps);
          p.v_first = v_first;
          // The virtual blocks of each kind of phase, all layers (the grid is the largest: grid_blocks).
          int64_t numel = 0, pass_blocks = 0, sums_blocks = 0, mv_blocks = 0, rmv_blocks = 0, divide_blocks = 0;
          bool spread = false, divide = false;
          for (int l = 0; l < p.count; ++l) {
            const size_t i = order[start + l];
            const ForwardLayer& layer = layers[i];
            LayerForward<scalar_t, acc_t>& L = p.layers[l];
            // Written only where the layer's Finish commits (Vectors).
            scalar_t* u_in = const_cast<scalar_t*>(layer.u_in.const_data_ptr<scalar_t>());
            scalar_t* v_in = const_cast<scalar_t*>(layer.v_in.const_data_ptr<scalar_t>());
            L.w = layer.w3.const_data_ptr<scalar_t>();
            L.wv = view_of(layer.w3);
            L.out = layer.out3.defined() ? layer.out3.mutable_data_ptr<scalar_t>() : nullptr;
            L.ov = layer.out3.defined() ? view_of(layer.out3) : View3d{};
            L.vec = Vectors<scalar_t>{u_in,
                                      layer.u_in.stride(0),
                                      v_in,
                                      layer.v_in.stride(0),
                                      layer.u_work.mutable_data_ptr<scalar_t>(),
                                      layer.v_work.mutable_data_ptr<scalar_t>(),
                                      layer.u_in.numel(),
                                      layer.v_in.numel()};
            L.finish = layer.finish;
            L.v_first = layer.v_first;
            L.v_order = block_walk::ColumnOrder::of(layer.column_groups,
                                                    layer.column_groups > 0 ? L.wv.cols() / layer.column_groups : 0);
            L.partial = workspace.mutable_data_ptr<acc_t>() + partial_offsets[i];
            L.degenerate = degenerate.mutable_data_ptr<int>() + 2 * i;
            L.sigma = sigmas.mutable_data_ptr<acc_t>() + i;
            L.numel = layer.w3.numel();
            numel += L.numel;
            L.divide_packed = layer.out3.defined() && packable(layer.w3) && packable(layer.out3);
            L.scaled = scaled_form_of<acc_t>(layer.scaling);
            L.rows_packed = rows_packed[i];
            divide = divide || layer.out3.defined();
            if (fused) {
              L.fused = fused_plans[i];
              spread = spread || !L.fused.dense();
              p.steps = std::max(p.steps, fused_steps(n, L.v_first, L.fused.dense()));
              pass_blocks += L.fused.blocks;
              sums_blocks += L.fused.reduce_blocks;
              continue;
            }
            const SplitPlan &mv = mv_plans[i], &rmv = rmv_plans[i];
            L.split.mv_lanes = mv.lanes;
            L.split.mv_chunk = mv.chunk;
            L.split.mv_blocks_x = static_cast<int>(mv.grid.x);
            L.split.mv_splits = static_cast<int>(mv.splits);
            L.split.rmv_lanes = rmv.lanes;
            L.split.rmv_chunk = rmv.chunk;
            L.split.rmv_blocks_x = static_cast<int>(rmv.grid.x);
            L.split.rmv_splits = static_cast<int>(rmv.splits);
            L.split.divide_blocks = layer.out3.defined() ? elementwise_blocks(L.numel) : 0;
            mv_blocks += int64_t{mv.grid.x} * mv.splits;
            rmv_blocks += n > 0 ? int64_t{rmv.grid.x} * rmv.splits : 0;
            divide_blocks += L.split.divide_blocks;
          }
          if (fused) {
            // Dense layers only: a block per layer, each working alone (one ordinary launch).
            constexpr auto kernel = forward_kernel<scalar_t, acc_t, index_t, kLayers, true>;
            launch_steps<kernel>(p, p.steps, spread ? grid_blocks<kernel>(std::max(pass_blocks, sums_blocks)) : p.count,
                                 !spread);
          } else {
            constexpr auto kernel = forward_kernel<scalar_t, acc_t, index_t, kLayers, false>;
            const int64_t wanted = std::max({mv_blocks, rmv_blocks, divide_blocks, int64_t{p.count}});
            launch_steps<kernel>(p, split_steps(n, divide), split_launch_blocks<kernel>(numel, wanted));
          }
        }
      });
    });
  });
}

int64_t forward_column_groups(const at::Tensor& weight, int64_t dim) {
  return round_mode() == RoundMode::kFused ? memory_column_groups(weight, dim) : 0;
}

namespace {

// One launch: the rounds write the vectors used into fresh outputs and, on success, into u and v (Finish::kBoth).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_normalize_cuda(
    const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t dim, int64_t n, double eps, bool v_first,
    std::optional<double> coeff, const std::optional<at::Tensor>& gamma, bool /*sigma_grad: autograd's*/) {
  constexpr const char* op = "sn_ext::spectral_normalize_";
  const c10::cuda::CUDAGuard guard(weight.device());
  const MatrixShape shape = check_forward_args(op, weight, u, v, dim, n, eps);
  const Scaling scaling{coeff, gamma};
  check_scaling(op, weight, scaling);
  const int64_t groups = forward_column_groups(weight, dim);
  WeightShapedOutput out(weight, shape, groups);
  at::Tensor sigma = at::empty({}, weight.options().dtype(sigma_dtype(weight.scalar_type())));
  at::Tensor u_used = at::empty_like(u, at::MemoryFormat::Contiguous);
  at::Tensor v_used = at::empty_like(v, at::MemoryFormat::Contiguous);
  // n == 0 reads and returns the buffers and changes nothing.
  run_forward({{as_matrix3d(weight, shape, groups), out.view3d, u, v, u_used, v_used,
                n == 0 ? Finish::kRestore : Finish::kBoth, v_first, groups, scaling}},
              sigma, n, eps);
  return {out.finish(), sigma, u_used, v_used};
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, CUDA, m) {
  m.impl("spectral_normalize_", &spectral_normalize_cuda);
}

}  // namespace sn_ext
