// CUDA kernels for the sn_ext ops: the semantics of csrc/cpu/spectral_norm_cpu.cpp (the reference), on the GPU.
//
// ONE launch per op, for one layer or for a whole group of layers (sn_ext.grouped_spectral_norm):
//   spectral_normalize, power_iteration_, spectral_normalize_grouped_  -> forward_kernel
//   spectral_normalize_backward, spectral_normalize_grouped_backward   -> backward_kernel
// Each is a persistent kernel started with a cooperative launch, so that all its blocks are resident at once and
// may wait for each other at a grid-wide barrier. Between barriers, the blocks walk the "virtual blocks" of one
// phase for all the layers of the launch (the split plans and __device__ phase functions of common.cuh):
//
//   forward, per round (u-first):  W v (all layers) | u = N(.) (one block per layer) | W^T u | v = N(.), sigma
//            (v-first, legacy:     W^T u | v = N(.) | W v | u = N(.), sigma)
//            then:                 W / sigma (all layers)          -> 4n + 1 phases, 4n barriers (n = 0: 3, 2)
//   backward:                      <G, W_sn> partial sums | their totals (one block per layer) | (G - lambda u v^T)
//                                  / sigma                         -> 3 phases, 2 barriers
//
// Why W is read from device memory in every phase rather than kept on chip across them (the design notes' ideal of
// one read of W): a GAN discriminator's weights, a few MB to tens of MB, stay in the 50-60 MB L2 of an H100/H200
// between the phases of one launch, and the phases stay simple, shared between one layer and many. What the single
// launch removes is the per-launch cost that dominates spectral norm at these sizes (torch: ~26 launches per layer
// per step). A weight far larger than L2 is read 3 times (n = 1) and W_sn written once.
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
// The layers' plans travel as one __grid_constant__ kernel parameter (read in place, never copied per thread).
// Kernel parameters may take up to 32 KB since CUDA 12.1; that bounds a launch to kMaxLayers layers, and a larger
// group takes one launch per kMaxLayers layers.
//
// Only c10's CUDA headers are used (c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream
// forwards to): ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers that a minimal CUDA toolkit lacks.
#include <cooperative_groups.h>

#include <vector>

#include "common.cuh"

namespace sn_ext {
namespace {

namespace cg = cooperative_groups;

constexpr int kMaxLayers = 48;

template <typename scalar_t, typename acc_t>
struct LayerForward {
  const scalar_t* w;
  View3d wv;
  scalar_t* out;  // W_sn through ov; nullptr for power_iteration_ (no division)
  View3d ov;
  Vectors<scalar_t> vec;
  Finish finish;   // what the last normalize does with the vectors (see Finish)
  acc_t* partial;  // this layer's workspace for the split matvecs
  int* degenerate;
  acc_t* sigma;
  int mv_lanes, rmv_lanes;
  int64_t mv_chunk, mv_blocks_x, mv_splits;
  int64_t rmv_chunk, rmv_blocks_x, rmv_splits;
  int64_t numel, divide_blocks;
  int64_t mv_first, rmv_first, divide_first;  // this layer's first virtual block in each phase
};

template <typename scalar_t, typename acc_t>
struct ForwardLaunch {
  LayerForward<scalar_t, acc_t> layers[kMaxLayers];
  int count;
  int64_t mv_total, rmv_total, divide_total;  // virtual blocks per phase, all layers
  int64_t n;
  acc_t eps;
  bool v_first;
};

template <typename scalar_t, typename acc_t>
struct LayerBackward {
  const scalar_t* g;
  View3d gv;
  const scalar_t* s;  // W_sn
  View3d sv;
  scalar_t* out;
  View3d ov;
  const scalar_t* u;
  int64_t u_stride;
  const scalar_t* v;
  int64_t v_stride;
  const acc_t* sigma;
  acc_t* partial;  // lambda's partial sums, then lambda itself at partial[lambda_blocks]
  int64_t numel, lambda_blocks, elementwise_blocks;
  int64_t lambda_first, elementwise_first;
};

template <typename scalar_t, typename acc_t>
struct BackwardLaunch {
  LayerBackward<scalar_t, acc_t> layers[kMaxLayers];
  int count;
  int64_t lambda_total, elementwise_total;
};

static_assert(sizeof(ForwardLaunch<double, double>) <= 32764, "kernel parameters are limited to 32764 bytes");
static_assert(sizeof(BackwardLaunch<double, double>) <= 32764, "kernel parameters are limited to 32764 bytes");

// ---------------------------------------------------------------------------------------------------------------
// The kernels

// The layer that owns virtual block b of a phase, searching on from `layer` (b only grows within a phase).
template <typename Layer>
__device__ __forceinline__ int advance_layer(const Layer* layers, int count, int layer, int64_t b,
                                             int64_t Layer::* first) {
  while (layer + 1 < count && layers[layer + 1].*first <= b) ++layer;
  return layer;
}

// W x for every layer: x is the input v (`from_input`) or the round's v.
template <typename scalar_t, typename acc_t>
__device__ void matvec_phase(const ForwardLaunch<scalar_t, acc_t>& p, bool from_input) {
  int layer = 0;
  for (int64_t b = blockIdx.x; b < p.mv_total; b += gridDim.x) {
    layer = advance_layer(p.layers, p.count, layer, b, &LayerForward<scalar_t, acc_t>::mv_first);
    const LayerForward<scalar_t, acc_t>& L = p.layers[layer];
    const int64_t local = b - L.mv_first;
    const MatvecArgs<scalar_t, acc_t> args{
        L.w,        L.wv,      from_input ? L.vec.v_in : L.vec.v_work, from_input ? L.vec.v_stride : 1, L.partial,
        L.mv_lanes, L.mv_chunk};
    matvec_block(args, local % L.mv_blocks_x, local / L.mv_blocks_x);
    __syncthreads();  // the next virtual block reuses this one's shared memory
  }
}

// W^T y for every layer: y is the input u (`from_input`) or the round's u.
template <typename scalar_t, typename acc_t>
__device__ void rmatvec_phase(const ForwardLaunch<scalar_t, acc_t>& p, bool from_input) {
  int layer = 0;
  for (int64_t b = blockIdx.x; b < p.rmv_total; b += gridDim.x) {
    layer = advance_layer(p.layers, p.count, layer, b, &LayerForward<scalar_t, acc_t>::rmv_first);
    const LayerForward<scalar_t, acc_t>& L = p.layers[layer];
    const int64_t local = b - L.rmv_first;
    const RmatvecArgs<scalar_t, acc_t> args{
        L.w,         L.wv,       from_input ? L.vec.u_in : L.vec.u_work, from_input ? L.vec.u_stride : 1, L.partial,
        L.rmv_lanes, L.rmv_chunk};
    rmatvec_block(args, local % L.rmv_blocks_x, local / L.rmv_blocks_x);
    __syncthreads();
  }
}

// u = N(W v) (`into_u`) or v = N(W^T u), one block per layer; the last half-step also writes sigma and finishes.
template <typename scalar_t, typename acc_t>
__device__ void normalize_phase(const ForwardLaunch<scalar_t, acc_t>& p, bool into_u, bool first, bool last) {
  for (int l = blockIdx.x; l < p.count; l += gridDim.x) {
    const LayerForward<scalar_t, acc_t>& L = p.layers[l];
    const NormalizeArgs<scalar_t, acc_t> args{L.partial,
                                              into_u ? L.wv.rows : L.wv.cols(),
                                              into_u ? L.mv_splits : L.rmv_splits,
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

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(const __grid_constant__ ForwardLaunch<scalar_t, acc_t> p) {
  cg::grid_group grid = cg::this_grid();
  if (p.n == 0) {  // sigma = u^T W v with the input vectors, which are also the returned ones
    matvec_phase(p, true);
    grid.sync();
    for (int l = blockIdx.x; l < p.count; l += gridDim.x) {
      const LayerForward<scalar_t, acc_t>& L = p.layers[l];
      dot_block(L.partial, L.mv_splits, L.vec, L.sigma, L.finish != Finish::kCommit);
      __syncthreads();
    }
  }
  for (int64_t k = 0; k < p.n; ++k) {
    const bool first = k == 0, last = k == p.n - 1;
    if (p.v_first) {
      rmatvec_phase(p, first);
      grid.sync();
      normalize_phase(p, false, first, false);
      grid.sync();
      matvec_phase(p, false);
      grid.sync();
      normalize_phase(p, true, false, last);
    } else {
      matvec_phase(p, first);
      grid.sync();
      normalize_phase(p, true, first, false);
      grid.sync();
      rmatvec_phase(p, false);
      grid.sync();
      normalize_phase(p, false, false, last);
    }
    if (!last) grid.sync();
  }
  if (p.divide_total == 0) return;  // power_iteration_
  grid.sync();
  int layer = 0;
  for (int64_t b = blockIdx.x; b < p.divide_total; b += gridDim.x) {
    layer = advance_layer(p.layers, p.count, layer, b, &LayerForward<scalar_t, acc_t>::divide_first);
    const LayerForward<scalar_t, acc_t>& L = p.layers[layer];
    divide_block(L.w, L.wv, L.out, L.ov, *L.sigma, static_cast<index_t>(L.numel),
                 static_cast<index_t>(b - L.divide_first), static_cast<index_t>(L.divide_blocks));
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads) backward_kernel(const __grid_constant__ BackwardLaunch<scalar_t, acc_t> p) {
  cg::grid_group grid = cg::this_grid();
  using Layer = LayerBackward<scalar_t, acc_t>;
  // lambda = <G, W_sn>: partial sums
  int layer = 0;
  for (int64_t b = blockIdx.x; b < p.lambda_total; b += gridDim.x) {
    layer = advance_layer(p.layers, p.count, layer, b, &Layer::lambda_first);
    const Layer& L = p.layers[layer];
    const int64_t local = b - L.lambda_first;
    const acc_t sum = lambda_partial_block<scalar_t, acc_t, index_t>(
        L.g, L.gv, L.s, L.sv, static_cast<index_t>(L.numel), static_cast<index_t>(local),
        static_cast<index_t>(L.lambda_blocks));
    if (threadIdx.x == 0) L.partial[local] = sum;
  }
  grid.sync();
  // their totals, one block per layer
  for (int l = blockIdx.x; l < p.count; l += gridDim.x) {
    const Layer& L = p.layers[l];
    const acc_t total = lambda_total_block(L.partial, L.lambda_blocks);
    if (threadIdx.x == 0) L.partial[L.lambda_blocks] = total;
  }
  grid.sync();
  // (G - lambda u v^T) / sigma
  layer = 0;
  for (int64_t b = blockIdx.x; b < p.elementwise_total; b += gridDim.x) {
    layer = advance_layer(p.layers, p.count, layer, b, &Layer::elementwise_first);
    const Layer& L = p.layers[layer];
    backward_block(L.g, L.gv, L.out, L.ov, L.u, L.u_stride, L.v, L.v_stride, L.partial[L.lambda_blocks], *L.sigma,
                   static_cast<index_t>(L.numel), static_cast<index_t>(b - L.elementwise_first),
                   static_cast<index_t>(L.elementwise_blocks));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launching

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

// A cooperative launch of kernel(params) on the current stream, with as many blocks as the largest phase has
// virtual blocks, at most all that fit at once.
template <auto kernel, typename Params>
void launch_cooperative(const Params& params, int64_t wanted_blocks) {
  const int64_t blocks = std::max<int64_t>(1, std::min(wanted_blocks, resident_blocks<kernel>()));
  void* args[] = {const_cast<Params*>(&params)};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned>(blocks)),
                                             dim3(kThreads), args, 0, c10::cuda::getCurrentCUDAStream()));
}

// One layer of a forward launch, as tensors. u_in, v_in: the vectors to start from; u_work, v_work: where the
// rounds write theirs (contiguous); `finish` says whether they are the outputs, scratch to commit into u_in, v_in,
// or both. `out`: W_sn's (outer, rows, inner) view, undefined for no division.
struct ForwardLayer {
  at::Tensor w3, out3, u_in, v_in, u_work, v_work;
  Finish finish;
};

// Runs the forward of `layers` (one dtype and device): n rounds, then W / sigma; sigma[i] (a contiguous tensor
// of one value per layer, of any shape) for layer i.
void forward(const std::vector<ForwardLayer>& layers, const at::Tensor& sigmas, int64_t n, double eps, bool v_first) {
  const at::Tensor& w0 = layers[0].w3;
  const auto acc_options = w0.options().dtype(sigmas.scalar_type());
  std::vector<SplitPlan> mv_plans, rmv_plans;
  std::vector<int64_t> partial_offsets{0};
  int64_t max_numel = 0;
  for (const ForwardLayer& layer : layers) {
    const View3d view = view_of(layer.w3);
    mv_plans.push_back(plan_matvec(view));
    rmv_plans.push_back(plan_rmatvec(view));
    partial_offsets.push_back(partial_offsets.back() +
                              std::max(mv_plans.back().splits * view.rows, rmv_plans.back().splits * view.cols()));
    max_numel = std::max(max_numel, layer.w3.numel());
  }
  at::Tensor workspace = at::empty({partial_offsets.back()}, acc_options);
  // No memset: each layer's first half-step writes its flag instead of adding to it.
  at::Tensor degenerate = at::empty({static_cast<int64_t>(layers.size())}, w0.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w0.scalar_type(), "sn_ext_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(max_numel, [&](auto tag) {
      using index_t = decltype(tag);
      for (size_t start = 0; start < layers.size(); start += kMaxLayers) {
        ForwardLaunch<scalar_t, acc_t> p{};
        p.count = static_cast<int>(std::min<size_t>(kMaxLayers, layers.size() - start));
        p.n = n;
        p.eps = static_cast<acc_t>(eps);
        p.v_first = v_first;
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
          L.degenerate = degenerate.mutable_data_ptr<int>() + i;
          L.sigma = sigmas.mutable_data_ptr<acc_t>() + i;
          L.mv_lanes = mv.lanes;
          L.mv_chunk = mv.chunk;
          L.mv_blocks_x = mv.grid.x;
          L.mv_splits = mv.splits;
          L.rmv_lanes = rmv.lanes;
          L.rmv_chunk = rmv.chunk;
          L.rmv_blocks_x = rmv.grid.x;
          L.rmv_splits = rmv.splits;
          L.numel = layer.w3.numel();
          L.divide_blocks = layer.out3.defined() ? elementwise_blocks(L.numel) : 0;
          L.mv_first = p.mv_total;
          L.rmv_first = p.rmv_total;
          L.divide_first = p.divide_total;
          p.mv_total += mv.grid.x * mv.splits;
          p.rmv_total += rmv.grid.x * rmv.splits;
          p.divide_total += L.divide_blocks;
        }
        const int64_t wanted = std::max({p.mv_total, n > 0 ? p.rmv_total : 0, p.divide_total, int64_t{p.count}});
        launch_cooperative<forward_kernel<scalar_t, acc_t, index_t>>(p, wanted);
      }
    });
  });
}

// One layer of a backward launch: grad_W = (G - <G, W_sn> u v^T) / sigma, written through out3.
struct BackwardLayer {
  at::Tensor g3, s3, out3, u, v;
};

void backward(const std::vector<BackwardLayer>& layers, const at::Tensor& sigmas) {
  const at::Tensor& s0 = layers[0].s3;
  const auto acc_options = s0.options().dtype(sigmas.scalar_type());
  std::vector<int64_t> partial_offsets{0};
  int64_t max_numel = 0;
  for (const BackwardLayer& layer : layers) {
    partial_offsets.push_back(partial_offsets.back() + lambda_blocks_for(layer.s3.numel()) + 1);
    max_numel = std::max(max_numel, layer.s3.numel());
  }
  at::Tensor workspace = at::empty({partial_offsets.back()}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s0.scalar_type(), "sn_ext_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(max_numel, [&](auto tag) {
      using index_t = decltype(tag);
      for (size_t start = 0; start < layers.size(); start += kMaxLayers) {
        BackwardLaunch<scalar_t, acc_t> p{};
        p.count = static_cast<int>(std::min<size_t>(kMaxLayers, layers.size() - start));
        for (int l = 0; l < p.count; ++l) {
          const size_t i = start + l;
          const BackwardLayer& layer = layers[i];
          LayerBackward<scalar_t, acc_t>& L = p.layers[l];
          L.g = layer.g3.const_data_ptr<scalar_t>();
          L.gv = view_of(layer.g3);
          L.s = layer.s3.const_data_ptr<scalar_t>();
          L.sv = view_of(layer.s3);
          L.out = layer.out3.mutable_data_ptr<scalar_t>();
          L.ov = view_of(layer.out3);
          L.u = layer.u.const_data_ptr<scalar_t>();
          L.u_stride = layer.u.stride(0);
          L.v = layer.v.const_data_ptr<scalar_t>();
          L.v_stride = layer.v.stride(0);
          L.sigma = sigmas.const_data_ptr<acc_t>() + i;
          L.partial = workspace.mutable_data_ptr<acc_t>() + partial_offsets[i];
          L.numel = layer.s3.numel();
          L.lambda_blocks = lambda_blocks_for(L.numel);
          L.elementwise_blocks = elementwise_blocks(L.numel);
          L.lambda_first = p.lambda_total;
          L.elementwise_first = p.elementwise_total;
          p.lambda_total += L.lambda_blocks;
          p.elementwise_total += L.elementwise_blocks;
        }
        const int64_t wanted = std::max({p.lambda_total, p.elementwise_total, int64_t{p.count}});
        launch_cooperative<backward_kernel<scalar_t, acc_t, index_t>>(p, wanted);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The ops

at::Tensor power_iteration_cuda(const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t dim, int64_t n,
                                double eps, bool v_first) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const MatrixShape shape = check_forward_args("sn_ext::power_iteration_", weight, u, v, dim, n, eps);
  at::Tensor sigma = at::empty({}, weight.options().dtype(sigma_dtype(weight.scalar_type())));
  // The rounds run on scratch vectors: u, v change only if no round was degenerate, decided on the device.
  forward({{as_matrix3d(weight, shape), at::Tensor(), u, v, at::empty({u.numel()}, u.options()),
            at::empty({v.numel()}, v.options()), Finish::kCommit}},
          sigma, n, eps, v_first);
  return sigma;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_normalize_cuda(const at::Tensor& weight,
                                                                                   const at::Tensor& u,
                                                                                   const at::Tensor& v, int64_t dim,
                                                                                   int64_t n, double eps,
                                                                                   bool v_first) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const MatrixShape shape = check_forward_args("sn_ext::spectral_normalize", weight, u, v, dim, n, eps);
  WeightShapedOutput out(weight, shape);
  at::Tensor sigma = at::empty({}, weight.options().dtype(sigma_dtype(weight.scalar_type())));
  at::Tensor u_new = at::empty_like(u, at::MemoryFormat::Contiguous);
  at::Tensor v_new = at::empty_like(v, at::MemoryFormat::Contiguous);
  forward({{as_matrix3d(weight, shape), out.view3d, u, v, u_new, v_new, Finish::kRestore}}, sigma, n, eps, v_first);
  return {out.finish(), sigma, u_new, v_new};
}

at::Tensor spectral_normalize_backward_cuda(const at::Tensor& grad, const at::Tensor& weight_sn, const at::Tensor& u,
                                            const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  const c10::cuda::CUDAGuard guard(weight_sn.device());
  const MatrixShape shape =
      check_backward_args("sn_ext::spectral_normalize_backward", grad, weight_sn, u, v, sigma, dim);
  WeightShapedOutput out(weight_sn, shape);
  // sigma is read by the kernel: bring it to the device and op-math dtype (a no-op for the forward's own sigma;
  // the CPU kernel's sigma.item() would be a host synchronization here).
  const at::Tensor sig = sigma.to(weight_sn.options().dtype(sigma_dtype(weight_sn.scalar_type()))).contiguous();
  backward({{as_matrix3d(grad, shape), as_matrix3d(weight_sn, shape), out.view3d, u, v}}, sig);
  return out.finish();
}

std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
spectral_normalize_grouped_cuda(at::TensorList weights, at::TensorList us, at::TensorList vs, at::IntArrayRef dims,
                                int64_t n, double eps) {
  const std::vector<MatrixShape> shapes =
      check_grouped_forward_args("sn_ext::spectral_normalize_grouped_", weights, us, vs, dims, n, eps);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  std::vector<WeightShapedOutput> outs;
  std::vector<at::Tensor> us_used, vs_used;
  std::vector<ForwardLayer> layers;
  for (size_t i = 0; i < weights.size(); ++i) {
    outs.emplace_back(weights[i], shapes[i]);
    us_used.push_back(at::empty_like(us[i], at::MemoryFormat::Contiguous));
    vs_used.push_back(at::empty_like(vs[i], at::MemoryFormat::Contiguous));
    // n == 0 reads and returns the buffers and changes nothing; otherwise the result goes to both.
    layers.push_back({as_matrix3d(weights[i], shapes[i]), outs[i].view3d, us[i], vs[i], us_used[i], vs_used[i],
                      n == 0 ? Finish::kRestore : Finish::kBoth});
  }
  at::Tensor sigmas = at::empty({static_cast<int64_t>(weights.size())},
                                weights[0].options().dtype(sigma_dtype(weights[0].scalar_type())));
  forward(layers, sigmas, n, eps, false);
  std::vector<at::Tensor> weights_sn;
  for (auto& out : outs) weights_sn.push_back(out.finish());
  return {weights_sn, sigmas, us_used, vs_used};
}

std::vector<at::Tensor> spectral_normalize_grouped_backward_cuda(at::TensorList grads, at::TensorList weights_sn,
                                                                 at::TensorList us, at::TensorList vs,
                                                                 const at::Tensor& sigmas, at::IntArrayRef dims) {
  const std::vector<MatrixShape> shapes = check_grouped_backward_args("sn_ext::spectral_normalize_grouped_backward",
                                                                      grads, weights_sn, us, vs, sigmas, dims);
  const c10::cuda::CUDAGuard guard(weights_sn[0].device());
  std::vector<WeightShapedOutput> outs;
  std::vector<BackwardLayer> layers;
  for (size_t i = 0; i < weights_sn.size(); ++i) {
    outs.emplace_back(weights_sn[i], shapes[i]);
    layers.push_back(
        {as_matrix3d(grads[i], shapes[i]), as_matrix3d(weights_sn[i], shapes[i]), outs[i].view3d, us[i], vs[i]});
  }
  backward(layers, sigmas.contiguous());
  std::vector<at::Tensor> grads_weight;
  for (auto& out : outs) grads_weight.push_back(out.finish());
  return grads_weight;
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, CUDA, m) {
  m.impl("power_iteration_", &power_iteration_cuda);
  m.impl("spectral_normalize", &spectral_normalize_cuda);
  m.impl("spectral_normalize_backward", &spectral_normalize_backward_cuda);
  m.impl("spectral_normalize_grouped_", &spectral_normalize_grouped_cuda);
  m.impl("spectral_normalize_grouped_backward", &spectral_normalize_grouped_backward_cuda);
}

}  // namespace sn_ext
