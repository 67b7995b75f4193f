// sn_ext::spectral_normalize_backward on CUDA, and the backward kernel that also serves
// spectral_normalize_grouped_backward (the design: spectral_normalize_cuda.cu):
//   <G, W_sn> partial sums | their totals (one block per layer) | (G - lambda u v^T) / sigma -> 3 phases, 2 barriers
#include <vector>

#include "common.cuh"
#include "kernels.h"

namespace sn_ext {
namespace {

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
  bool lambda_packed;       // G and W_sn contiguous and aligned (packable)
  bool elementwise_packed;  // G and grad_W contiguous and aligned, a line a whole number of packs
  int64_t lambda_first, elementwise_first;
};

// A backward launch's parameter block: up to kLayers layers (1 for a per-layer op, kGroupLayers for a grouped one).
template <typename scalar_t, typename acc_t, int kLayers>
struct BackwardLaunch {
  LayerBackward<scalar_t, acc_t> layers[kLayers];
  int count;
  int64_t lambda_total, elementwise_total;
  int64_t first_step, step_count;  // the phases this launch runs (launch_steps)
  bool one_block;                  // a one-block launch: __syncthreads between phases
};

static_assert(sizeof(BackwardLaunch<double, double, kGroupLayers>) <= kMaxParameterBytes,
              "a grouped backward launch's parameter block must stay under 4 KB");
static_assert(sizeof(BackwardLaunch<double, double, 1>) <= 512, "a per-layer backward launch passes a small block");

// The backward's phases: lambda = <G, W_sn> as partial sums | their totals, one block per layer |
// (G - lambda u v^T) / sigma.
constexpr int64_t kBackwardSteps = 3;

template <typename scalar_t, typename acc_t, typename index_t, int kLayers>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    backward_kernel(const __grid_constant__ BackwardLaunch<scalar_t, acc_t, kLayers> p) {
  using Layer = LayerBackward<scalar_t, acc_t>;
  for (int64_t s = p.first_step; s < p.first_step + p.step_count; ++s) {
    if (s > p.first_step) phase_barrier(p.one_block);
    if (s == 0) {  // lambda's partial sums
      for_each_virtual_block(p.layers, p.count, &Layer::lambda_first, p.lambda_total,
                             [&](const Layer& L, int64_t local) {
                               const acc_t sum = lambda_partial_block<scalar_t, acc_t, index_t>(
                                   L.g, L.gv, L.s, L.sv, L.lambda_packed, static_cast<index_t>(L.numel),
                                   static_cast<index_t>(local), static_cast<index_t>(L.lambda_blocks));
                               if (threadIdx.x == 0) L.partial[local] = sum;
                             });
    } else if (s == 1) {  // their totals, one block per layer
      for (int l = blockIdx.x; l < p.count; l += gridDim.x) {
        const Layer& L = p.layers[l];
        const acc_t total = ordered_sum_block(L.lambda_blocks, [&](int64_t j) { return L.partial[j]; });
        if (threadIdx.x == 0) L.partial[L.lambda_blocks] = total;
      }
    } else {  // (G - lambda u v^T) / sigma
      for_each_virtual_block(
          p.layers, p.count, &Layer::elementwise_first, p.elementwise_total, [&](const Layer& L, int64_t local) {
            backward_block(L.g, L.gv, L.out, L.ov, L.u, L.u_stride, L.v, L.v_stride, L.partial[L.lambda_blocks],
                           *L.sigma, L.elementwise_packed, static_cast<index_t>(L.numel), static_cast<index_t>(local),
                           static_cast<index_t>(L.elementwise_blocks));
          });
    }
  }
}

}  // namespace

void run_backward(const std::vector<BackwardLayer>& layers, const at::Tensor& sigmas) {
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
      with_layer_capacity(layers.size(), [&](auto capacity) {
        constexpr int kLayers = decltype(capacity)::value;
        for (size_t start = 0; start < layers.size(); start += kLayers) {
          BackwardLaunch<scalar_t, acc_t, kLayers> p{};
          p.count = static_cast<int>(std::min<size_t>(kLayers, layers.size() - start));
          int64_t numel = 0;
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
            numel += L.numel;
            L.lambda_blocks = lambda_blocks_for(L.numel);
            L.elementwise_blocks = elementwise_blocks(L.numel);
            L.lambda_packed = packable(layer.g3) && packable(layer.s3);
            L.elementwise_packed = packable(layer.g3, true) && packable(layer.out3, true);
            L.lambda_first = p.lambda_total;
            L.elementwise_first = p.elementwise_total;
            p.lambda_total += L.lambda_blocks;
            p.elementwise_total += L.elementwise_blocks;
          }
          const int64_t wanted = std::max({p.lambda_total, p.elementwise_total, int64_t{p.count}});
          constexpr auto kernel = backward_kernel<scalar_t, acc_t, index_t, kLayers>;
          launch_steps<kernel>(p, kBackwardSteps, launch_blocks<kernel>(numel, wanted));
        }
      });
    });
  });
}

namespace {

at::Tensor spectral_normalize_backward_cuda(const at::Tensor& grad, const at::Tensor& weight_sn, const at::Tensor& u,
                                            const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  const c10::cuda::CUDAGuard guard(weight_sn.device());
  const MatrixShape shape =
      check_backward_args("sn_ext::spectral_normalize_backward", grad, weight_sn, u, v, sigma, dim);
  WeightShapedOutput out(weight_sn, shape);
  // sigma is read by the kernel: bring it to the device and op-math dtype (a no-op for the forward's own sigma;
  // the CPU kernel's sigma.item() would be a host synchronization here).
  const at::Tensor sig = sigma.to(weight_sn.options().dtype(sigma_dtype(weight_sn.scalar_type()))).contiguous();
  run_backward({{as_matrix3d(grad, shape), as_matrix3d(weight_sn, shape), out.view3d, u, v}}, sig);
  return out.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, CUDA, m) {
  m.impl("spectral_normalize_backward", &spectral_normalize_backward_cuda);
}

}  // namespace sn_ext
