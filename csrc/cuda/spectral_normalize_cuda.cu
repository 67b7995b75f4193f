// sn_ext::spectral_normalize on CUDA, and the design of the CUDA kernels: the semantics of the CPU kernels (csrc/cpu,
// the reference), on the GPU.
//
// ONE launch per op, for one layer or for a whole group of layers (sn_ext.grouped_spectral_norm; phased: one per
// phase):
//   spectral_normalize, power_iteration_, spectral_normalize_grouped_  -> forward_kernel
//   spectral_normalize_backward, spectral_normalize_grouped_backward   -> backward_kernel
// Each is a persistent kernel started with a cooperative launch (or in one block), so that all its blocks are
// resident at once and may wait for each other at a grid-wide barrier. Between barriers, the blocks walk the "virtual
// blocks" of one phase for all the layers of the launch (the split plans and __device__ phase functions of common.cuh):
//
//   forward, per round (u-first, fused; SN_EXT_CUDA_ROUND=fused, the default):
//                                  y = W v and z = W^T y in one pass (blocks owning whole rows, all layers) |
//                                  z / max(|y|, eps) from the blocks' partial z rows, in a fixed order (all layers) |
//                                  u = N(y), v = N(z / max(|y|, eps)), sigma (many blocks per layer: each adds the
//                                  previous phases' partial squares itself, in one fixed order)
//            (u-first, split:      W v | u = N(.) (one block per layer) | W^T u | v = N(.), sigma)
//            (v-first, legacy, always split: W^T u | v = N(.) | W v | u = N(.), sigma)
//            then:                 W / sigma (all layers)   -> fused 3n + 1 phases, 3n barriers; split 4n + 1, 4n;
//                                                              n = 0: 3, 2
//   backward:                      <G, W_sn> partial sums | their totals (one block per layer) | (G - lambda u v^T)
//                                  / sigma                         -> 3 phases, 2 barriers
//
// The fused round is the CPU kernel's matvec_and_gram: it reads W once per round, so that a forward with n = 1
// reads W twice and writes W_sn once, the minimum (7 weight-sized passes per train step with the backward's 4).
// Rows wider than what a block holds in registers (4096 float32 columns; fused_round_block) take a second read of
// the block's rows, from L2 where they still are. The split round reads W twice per round (8 passes); it stays as
// the v-first round and as the fallback that benchmarks/gpu_check.sh switches to if the fused round fails its
// first GPU check (the two agree to float rounding: their sums run in other orders).
//
// Why W is otherwise read from device memory in every phase rather than kept on chip across them: a GAN
// discriminator's weights, a few MB to tens of MB, stay in the 50-60 MB L2 of an H100/H200 between the phases of one
// launch, and the phases stay simple, shared between one layer and many. What the single launch removes is the
// per-launch cost that dominates spectral norm at these sizes (torch: ~26 launches per layer per step).
//
// Everything stays on the device: sigma, the "a round met a degenerate vector" flags and lambda are device values,
// never copied to the host, so the ops never synchronize and can be captured in a CUDA graph.
//
// Reductions are deterministic: every sum is split into pieces fixed by the shape alone (not by the device, the
// grid size or timing) and combined in a fixed order; no floating-point atomics. The same inputs give the same bits,
// and a layer gives the same bits alone or in a group.
//
// Sums accumulate in at::opmath_type<scalar_t> (float for float16/bfloat16/float32, double for float64), which is
// also sigma's dtype (sigma_dtype in matrix_view.h). The CPU kernels accumulate in double for every dtype, so
// float32 results agree with them to float32 rounding, not bit for bit.
//
// The layers' plans travel as one __grid_constant__ kernel parameter (read in place, never copied per thread), under
// 4 KB: one layer for a per-layer op, up to kGroupLayers for a grouped one (a larger group takes one launch per
// kGroupLayers layers).
//
// Size classes and launch modes (common.cuh: kOneBlockMaxNumel, launch_blocks, launch_steps): small weights run in
// one block, phases separated by __syncthreads, with an ordinary launch; larger ones on a grid sized by their work,
// with a cooperative launch, or, where that is refused or SN_EXT_CUDA_LAUNCH=phased (launch.h), one ordinary launch
// per phase. The phases' split into virtual blocks is the same in all three, so are the result bits.
//
// Only c10's CUDA headers are used (c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream
// forwards to): ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers that a minimal CUDA toolkit lacks.
#include <optional>
#include <vector>

#include "common.cuh"
#include "kernels.h"
#include "scaled_fallback.h"

namespace sn_ext {
namespace {

template <typename scalar_t, typename acc_t>
struct LayerForward {
  const scalar_t* w;
  View3d wv;
  scalar_t* out;  // W_sn through ov; nullptr for power_iteration_ (no division)
  View3d ov;
  Vectors<scalar_t> vec;
  Finish finish;       // what the last normalize does with the vectors (see Finish)
  bool divide_packed;  // W and W_sn contiguous and aligned (packable)
  // The round (fused, or split: matvec_block, rmatvec_block) reads W's rows in 16-byte packs (rows_packable; false
  // under SN_EXT_CUDA_ROUND=split-scalar, which runs the scalar loops).
  bool rows_packed;
  // This layer's workspace: the split products' partial sums, or the fused round's (fused_workspace).
  acc_t* partial;
  // Two flags "a round met a degenerate vector": the split rounds use [0]; fused round r writes [r % 2] and reads the
  // previous round's [(r + 1) % 2], which its blocks read while one of them writes.
  int* degenerate;
  acc_t* sigma;
  // 32-bit where the plan bounds them (kMaxGridY splits, int32 grid.x: finish_split), so that kGroupLayers layers
  // stay under kMaxParameterBytes.
  int mv_lanes, rmv_lanes, mv_splits, rmv_splits, mv_blocks_x, rmv_blocks_x;
  int64_t mv_chunk, rmv_chunk;
  int64_t numel, divide_blocks;
  // This layer's first virtual block in each phase (the fused round's: its pass, column sums, normalization).
  int64_t mv_first, rmv_first, divide_first, fused_first, reduce_first, fused_normalize_first;
};

// A forward launch's parameter block: up to kLayers layers (1 for a per-layer op, kGroupLayers for a grouped one).
template <typename scalar_t, typename acc_t, int kLayers>
struct ForwardLaunch {
  using scalar_type = scalar_t;
  using acc_type = acc_t;
  using Layer = LayerForward<scalar_t, acc_t>;
  Layer layers[kLayers];
  int count;
  int64_t mv_total, rmv_total, divide_total;  // virtual blocks per phase, all layers
  int64_t fused_total, reduce_total, fused_normalize_total;
  int64_t n;
  acc_t eps;
  bool v_first;
  bool fused;  // u-first rounds as fused_round_block | reduce_columns_block | normalize both (RoundMode::kFused)
  int64_t first_step, step_count;  // the phases this launch runs (launch_steps)
  bool one_block;                  // a one-block launch: __syncthreads between phases
};

static_assert(sizeof(ForwardLaunch<double, double, kGroupLayers>) <= kMaxParameterBytes,
              "a grouped forward launch's parameter block must stay under 4 KB");
static_assert(sizeof(ForwardLaunch<double, double, 1>) <= 512, "a per-layer forward launch passes a small block");

// The forward's phases, in the order forward_step lists them.
enum class ForwardPhase : int {
  kMatvec,
  kRmatvec,
  kNormalizeU,
  kNormalizeV,
  kFused,
  kReduce,
  kNormalizeBoth,
  kDot,
  kDivide
};

struct ForwardStep {
  ForwardPhase phase;
  int64_t round;  // the fused round's index (its degenerate flags)
  bool first;     // matvec / rmatvec: from the input vectors; normalize: the call's first half-step (starts the flag)
  bool last;      // normalize: the call's last half-step (writes sigma, finishes the vectors)
};

// The phases of n rounds: n = 0 is W v then sigma = u^T (W v); a split round is four phases (two matrix-vector
// products, each followed by its normalization), a fused one three (W v and W^T (W v) in one pass | the blocks' z
// sums added | u and v normalized).
__host__ __device__ inline int64_t round_steps(int64_t n, bool fused) {
  return n == 0 ? 2 : (fused ? 3 : 4) * n;
}

// How many phases a forward of n rounds has: the rounds, then W / sigma, except for power_iteration_.
__host__ __device__ inline int64_t forward_steps(int64_t n, bool fused, bool divide) {
  return round_steps(n, fused) + (divide ? 1 : 0);
}

// Phase s of the forward (s < forward_steps(n, ...)). A fused u-first round: W v and W^T (W v) | z summed |
// u = N(y), v = N(z / max(|y|, eps)); a split u-first round: W v | u = N(.) | W^T u | v = N(.); a v-first (legacy)
// round, always split: W^T u | v = N(.) | W v | u = N(.).
__device__ inline ForwardStep forward_step(int64_t s, int64_t n, bool v_first, bool fused) {
  using P = ForwardPhase;
  if (s >= round_steps(n, fused)) return {P::kDivide, 0, false, false};
  if (n == 0) return {s == 0 ? P::kMatvec : P::kDot, 0, true, false};
  if (fused) {
    const int64_t round = s / 3;
    const bool first = round == 0, last = round == n - 1;
    switch (s % 3) {
      case 0:
        return {P::kFused, round, first, false};
      case 1:
        return {P::kReduce, round, false, false};
      default:
        return {P::kNormalizeBoth, round, first, last};
    }
  }
  const int64_t round = s / 4;
  const bool first = round == 0, last = round == n - 1;
  switch (s % 4) {
    case 0:
      return {v_first ? P::kRmatvec : P::kMatvec, round, first, false};
    case 1:
      return {v_first ? P::kNormalizeV : P::kNormalizeU, round, first, false};
    case 2:
      return {v_first ? P::kMatvec : P::kRmatvec, round, false, false};
    default:
      return {v_first ? P::kNormalizeU : P::kNormalizeV, round, false, last};
  }
}

// W x for every layer: x is the input v (`from_input`) or the round's v.
template <typename Launch>
__device__ void matvec_phase(const Launch& p, bool from_input) {
  using Layer = typename Launch::Layer;
  for_each_virtual_block(p.layers, p.count, &Layer::mv_first, p.mv_total, [&](const Layer& L, int64_t local) {
    const MatvecArgs<typename Launch::scalar_type, typename Launch::acc_type> args{
        L.w,        L.wv,      from_input ? L.vec.v_in : L.vec.v_work, from_input ? L.vec.v_stride : 1, L.partial,
        L.mv_lanes, L.mv_chunk};
    matvec_block(args, L.rows_packed, local % L.mv_blocks_x, local / L.mv_blocks_x);
    __syncthreads();  // the next virtual block reuses this one's shared memory
  });
}

// W^T y for every layer: y is the input u (`from_input`) or the round's u.
template <typename Launch>
__device__ void rmatvec_phase(const Launch& p, bool from_input) {
  using Layer = typename Launch::Layer;
  for_each_virtual_block(p.layers, p.count, &Layer::rmv_first, p.rmv_total, [&](const Layer& L, int64_t local) {
    const RmatvecArgs<typename Launch::scalar_type, typename Launch::acc_type> args{
        L.w,         L.wv,       from_input ? L.vec.u_in : L.vec.u_work, from_input ? L.vec.u_stride : 1, L.partial,
        L.rmv_lanes, L.rmv_chunk};
    rmatvec_block(args, L.rows_packed, local % L.rmv_blocks_x, local / L.rmv_blocks_x);
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
        into_u ? L.mv_splits : L.rmv_splits,
        into_u ? L.vec.u_work : L.vec.v_work,
        p.eps,
        L.degenerate,
        first,
        last ? L.sigma : nullptr,
        last ? L.finish : Finish::kNone,
        L.vec,
        static_cast<typename Launch::acc_type>(1)};
    normalize_block(args);
    __syncthreads();
  }
}

// The fused round's pass over W for every layer: x is the input v (`from_input`) or the round's v.
template <typename Launch>
__device__ void fused_phase(const Launch& p, bool from_input) {
  using Layer = typename Launch::Layer;
  using acc_t = typename Launch::acc_type;
  for_each_virtual_block(p.layers, p.count, &Layer::fused_first, p.fused_total, [&](const Layer& L, int64_t local) {
    const auto* x = from_input ? L.vec.v_in : L.vec.v_work;
    const int64_t x_stride = from_input ? L.vec.v_stride : 1;
    acc_t* const z_partial = L.partial + fused_workspace(L.wv.rows, L.wv.cols()).z_partial;
    if (L.rows_packed) {
      fused_round_block<true>(L.w, L.wv, x, x_stride, L.partial, z_partial, local);
    } else {
      fused_round_block<false>(L.w, L.wv, x, x_stride, L.partial, z_partial, local);
    }
  });
}

// z = W^T u from the fused blocks' partial z rows, and |y|^2's chunk sums, for every layer.
template <typename Launch>
__device__ void reduce_phase(const Launch& p) {
  using Layer = typename Launch::Layer;
  for_each_virtual_block(p.layers, p.count, &Layer::reduce_first, p.reduce_total, [&](const Layer& L, int64_t local) {
    const int64_t rows = L.wv.rows, cols = L.wv.cols();
    reduce_columns_block(L.partial, fused_workspace(rows, cols), rows, cols, p.eps, local);
  });
}

// The fused round's normalizations, u = N(y) and v = N(W^T u), spread over many blocks per layer; the last round
// also writes sigma and finishes.
template <typename Launch>
__device__ void normalize_both_phase(const Launch& p, int64_t round, bool first, bool last) {
  using Layer = typename Launch::Layer;
  for_each_virtual_block(
      p.layers, p.count, &Layer::fused_normalize_first, p.fused_normalize_total, [&](const Layer& L, int64_t local) {
        fused_normalize_block(L.partial, fused_workspace(L.wv.rows, L.wv.cols()), L.vec, p.eps,
                              first ? nullptr : L.degenerate + (round + 1) % 2, L.degenerate + round % 2,
                              last ? L.sigma : nullptr, last ? L.finish : Finish::kNone, local);
      });
}

// n == 0: sigma = u^T W v with the input vectors, which are also the returned ones; one block per layer.
template <typename Launch>
__device__ void dot_phase(const Launch& p) {
  for (int l = blockIdx.x; l < p.count; l += gridDim.x) {
    const typename Launch::Layer& L = p.layers[l];
    dot_block(L.partial, L.mv_splits, L.vec, L.sigma, L.finish != Finish::kCommit);
    __syncthreads();
  }
}

// W / sigma for every layer.
template <typename index_t, typename Launch>
__device__ void divide_phase(const Launch& p) {
  using Layer = typename Launch::Layer;
  for_each_virtual_block(p.layers, p.count, &Layer::divide_first, p.divide_total, [&](const Layer& L, int64_t local) {
    divide_block(L.w, L.wv, L.out, L.ov, *L.sigma, L.divide_packed, static_cast<index_t>(L.numel),
                 static_cast<index_t>(local), static_cast<index_t>(L.divide_blocks));
  });
}

template <typename scalar_t, typename acc_t, typename index_t, int kLayers>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    forward_kernel(const __grid_constant__ ForwardLaunch<scalar_t, acc_t, kLayers> p) {
  for (int64_t s = p.first_step; s < p.first_step + p.step_count; ++s) {
    if (s > p.first_step) phase_barrier(p.one_block);
    const ForwardStep step = forward_step(s, p.n, p.v_first, p.fused);
    switch (step.phase) {
      case ForwardPhase::kMatvec:
        matvec_phase(p, step.first);
        break;
      case ForwardPhase::kRmatvec:
        rmatvec_phase(p, step.first);
        break;
      case ForwardPhase::kNormalizeU:
        normalize_phase(p, true, step.first, step.last);
        break;
      case ForwardPhase::kNormalizeV:
        normalize_phase(p, false, step.first, step.last);
        break;
      case ForwardPhase::kFused:
        fused_phase(p, step.first);
        break;
      case ForwardPhase::kReduce:
        reduce_phase(p);
        break;
      case ForwardPhase::kNormalizeBoth:
        normalize_both_phase(p, step.round, step.first, step.last);
        break;
      case ForwardPhase::kDot:
        dot_phase(p);
        break;
      case ForwardPhase::kDivide:
        divide_phase<index_t>(p);
        break;
    }
  }
}

}  // namespace

void run_forward(const std::vector<ForwardLayer>& layers, const at::Tensor& sigmas, int64_t n, double eps,
                 bool v_first) {
  const at::Tensor& w0 = layers[0].w3;
  const auto acc_options = w0.options().dtype(sigmas.scalar_type());
  // A launch's rounds are all fused or all split, so a layer's bits are the same alone or in a group.
  const RoundMode mode = round_mode();
  const bool fused = n > 0 && !v_first && mode == RoundMode::kFused;
  std::vector<SplitPlan> mv_plans, rmv_plans;
  std::vector<char> rows_packed;
  std::vector<int64_t> partial_offsets{0};
  int64_t max_numel = 0;
  for (const ForwardLayer& layer : layers) {
    const View3d view = view_of(layer.w3);
    rows_packed.push_back(mode != RoundMode::kSplitScalar && rows_packable(layer.w3));
    const int64_t pack = rows_packed.back() ? 16 / layer.w3.element_size() : 1;
    mv_plans.push_back(plan_matvec(view, pack));
    rmv_plans.push_back(plan_rmatvec(view, pack));
    // Fused: y, z and the blocks' partial z rows; split: the larger of the two products' partial sums (n == 0 and
    // the fused launch's W v use the matvec's).
    const int64_t split_size = std::max(mv_plans.back().splits * view.rows, rmv_plans.back().splits * view.cols());
    partial_offsets.push_back(partial_offsets.back() +
                              (fused ? fused_workspace(view.rows, view.cols()).size : split_size));
    max_numel = std::max(max_numel, layer.w3.numel());
  }
  at::Tensor workspace = at::empty({partial_offsets.back()}, acc_options);
  // No memset: each layer's first half-step writes its flag instead of adding to it. Two per layer (LayerForward).
  at::Tensor degenerate = at::empty({2 * static_cast<int64_t>(layers.size())}, w0.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w0.scalar_type(), "sn_ext_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(max_numel, [&](auto tag) {
      using index_t = decltype(tag);
      with_layer_capacity(layers.size(), [&](auto capacity) {
        constexpr int kLayers = decltype(capacity)::value;
        for (size_t start = 0; start < layers.size(); start += kLayers) {
          ForwardLaunch<scalar_t, acc_t, kLayers> p{};
          p.count = static_cast<int>(std::min<size_t>(kLayers, layers.size() - start));
          int64_t numel = 0;
          p.n = n;
          p.eps = static_cast<acc_t>(eps);
          p.v_first = v_first;
          p.fused = fused;
          for (int l = 0; l < p.count; ++l) {
            const size_t i = start + l;
            const ForwardLayer& layer = layers[i];
            const SplitPlan &mv = mv_plans[i], &rmv = rmv_plans[i];
            LayerForward<scalar_t, acc_t>& L = p.layers[l];
            const bool commits = layer.finish == Finish::kCommit || layer.finish == Finish::kBoth;
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
                                      commits ? u_in : nullptr,
                                      commits ? v_in : nullptr,
                                      layer.u_in.numel(),
                                      layer.v_in.numel()};
            L.finish = layer.finish;
            L.partial = workspace.mutable_data_ptr<acc_t>() + partial_offsets[i];
            L.degenerate = degenerate.mutable_data_ptr<int>() + 2 * i;
            L.sigma = sigmas.mutable_data_ptr<acc_t>() + i;
            L.mv_lanes = mv.lanes;
            L.mv_chunk = mv.chunk;
            L.mv_blocks_x = static_cast<int>(mv.grid.x);
            L.mv_splits = static_cast<int>(mv.splits);
            L.rmv_lanes = rmv.lanes;
            L.rmv_chunk = rmv.chunk;
            L.rmv_blocks_x = static_cast<int>(rmv.grid.x);
            L.rmv_splits = static_cast<int>(rmv.splits);
            L.numel = layer.w3.numel();
            numel += L.numel;
            L.divide_blocks = layer.out3.defined() ? elementwise_blocks(L.numel) : 0;
            L.divide_packed = layer.out3.defined() && packable(layer.w3) && packable(layer.out3);
            L.rows_packed = rows_packed[i];
            L.mv_first = p.mv_total;
            L.rmv_first = p.rmv_total;
            L.divide_first = p.divide_total;
            L.fused_first = p.fused_total;
            L.reduce_first = p.reduce_total;
            L.fused_normalize_first = p.fused_normalize_total;
            // A fused launch runs no matvec or rmatvec phase: their blocks count for nothing.
            p.mv_total += fused ? 0 : mv.grid.x * mv.splits;
            p.rmv_total += fused ? 0 : rmv.grid.x * rmv.splits;
            p.divide_total += L.divide_blocks;
            p.fused_total += fused ? fused_blocks(L.wv.rows) : 0;
            p.reduce_total += fused ? fused_reduce_blocks(L.wv.cols()) + fused_y_chunks(L.wv.rows) : 0;
            p.fused_normalize_total += fused ? fused_normalize_blocks(L.wv.rows, L.wv.cols()) : 0;
          }
          const int64_t wanted = std::max({p.mv_total, n > 0 ? p.rmv_total : 0, p.fused_total, p.reduce_total,
                                           p.fused_normalize_total, p.divide_total, int64_t{p.count}});
          constexpr auto kernel = forward_kernel<scalar_t, acc_t, index_t, kLayers>;
          launch_steps<kernel>(p, forward_steps(n, fused, p.divide_total > 0), launch_blocks<kernel>(numel, wanted));
        }
      });
    });
  });
}

namespace {

// One launch: the rounds write the vectors used into fresh outputs and, on success, into u and v (Finish::kBoth).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_normalize_cuda(
    const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t dim, int64_t n, double eps, bool v_first,
    std::optional<double> coeff, const std::optional<at::Tensor>& gamma, bool /*sigma_grad: autograd's*/) {
  const Scaling scaling{coeff, gamma};
  if (scaling.scaled())
    return scaled_forward_cuda(weight, u, v, dim, n, eps, v_first, scaling);  // not in the kernels yet
  const c10::cuda::CUDAGuard guard(weight.device());
  const MatrixShape shape = check_forward_args("sn_ext::spectral_normalize_", weight, u, v, dim, n, eps);
  WeightShapedOutput out(weight, shape);
  at::Tensor sigma = at::empty({}, weight.options().dtype(sigma_dtype(weight.scalar_type())));
  at::Tensor u_used = at::empty_like(u, at::MemoryFormat::Contiguous);
  at::Tensor v_used = at::empty_like(v, at::MemoryFormat::Contiguous);
  // n == 0 reads and returns the buffers and changes nothing.
  run_forward(
      {{as_matrix3d(weight, shape), out.view3d, u, v, u_used, v_used, n == 0 ? Finish::kRestore : Finish::kBoth}},
      sigma, n, eps, v_first);
  return {out.finish(), sigma, u_used, v_used};
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, CUDA, m) {
  m.impl("spectral_normalize_", &spectral_normalize_cuda);
}

}  // namespace sn_ext
