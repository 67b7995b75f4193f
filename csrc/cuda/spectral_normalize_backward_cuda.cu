// sn_ext::spectral_normalize_backward on CUDA, and the backward kernel that also serves
// spectral_normalize_grouped_backward (the design: spectral_normalize_cuda.cu):
//   <G, W_sn> partial sums, a piece of the elements per virtual block | lambda (each block adds the partial sums
//   itself, in order) and (G - lambda u v^T) / sigma over the same pieces, each walked back (the data the first phase
//   read last, read first)  -> 2 phases, 1 barrier
// A dense layer (block_walk::lambda_blocks_for: one piece, where the device-time model finds one block faster than
// a grid and its barrier) does both in one virtual block of the first phase.
// The scaled backward (spectral_normalize_scaled_backward, one layer) is the same two phases on W in place of W_sn,
// with the correction's terms of scaled_form.cuh (correction_terms); its block 0 writes gamma's gradient.
#include <optional>
#include <tuple>
#include <vector>

#include "common.cuh"
#include "elementwise.cuh"
#include "kernels.h"
#include "scaled_form.cuh"

namespace sn_ext {
namespace {

template <typename scalar_t, typename acc_t>
struct LayerBackward {
  const scalar_t* g;
  View3d gv;
  const scalar_t* s;  // W_sn (the scaled backward: W)
  View3d sv;
  scalar_t* out;
  View3d ov;
  const scalar_t* u;
  int64_t u_stride;
  const scalar_t* v;
  int64_t v_stride;
  block_walk::ColumnOrder v_order;  // the views' columns in memory order (a channels_last weight): v's of each
  const acc_t* sigma;
  acc_t* partial;  // lambda's partial sums, one per piece
  // The elements in `blocks` pieces of `chunk` (a whole number of packs): one virtual block each, in both phases.
  int64_t numel, blocks, chunk;
  bool lambda_packed;       // G and W_sn contiguous and aligned (packable)
  bool elementwise_packed;  // G and grad_W contiguous and aligned
  __device__ bool dense() const { return blocks == 1; }
};

// A backward launch's parameter block: up to kLayers layers (1 for a per-layer op, kGroupLayers for a grouped one).
template <typename scalar_t, typename acc_t, int kLayers>
struct BackwardLaunch {
  LayerBackward<scalar_t, acc_t> layers[kLayers];
  int count;
  int64_t first_step, step_count;  // the phases this launch runs (launch_steps)
  bool one_block;                  // a one-block launch: __syncthreads between phases
  ScaledBackward<acc_t> scaled;    // the scaled backward's terms (one layer), or grad_gamma nullptr
};

static_assert(sizeof(BackwardLaunch<double, double, kGroupLayers>) <= kMaxParameterBytes,
              "a grouped backward launch's parameter block must stay under 4 KB");
static_assert(sizeof(BackwardLaunch<double, double, 1>) <= 512, "a per-layer backward launch passes a small block");

template <typename scalar_t, typename acc_t, typename index_t>
__device__ acc_t lambda_share(const LayerBackward<scalar_t, acc_t>& L, const block_walk::Range& piece) {
  return lambda_range<scalar_t, acc_t, index_t>(L.g, L.gv, L.s, L.sv, L.lambda_packed, piece.begin, piece.end);
}

// Virtual block `local`'s piece of (G - lambda u v^T) / divisor, from the layer's sum (correction_terms).
template <typename scalar_t, typename acc_t, typename index_t>
__device__ void correct(const LayerBackward<scalar_t, acc_t>& L, const ScaledBackward<acc_t>& scaled,
                        const block_walk::Range& piece, int64_t local, acc_t sum) {
  const CorrectionTerms<acc_t> t = correction_terms(scaled, sum, *L.sigma, local == 0 && threadIdx.x == 0);
  correction_range<true, scalar_t, acc_t, index_t>(L.g, L.gv, L.out, L.ov, L.u, L.u_stride, L.v, L.v_stride, L.v_order,
                                                   t.lambda, t.divisor, L.elementwise_packed, piece.begin, piece.end);
}

// Its phases as straight-line code, not a loop over steps: a loop let the compiler keep what one phase computes from
// threadIdx live through the other, and spill.
template <typename scalar_t, typename acc_t, typename index_t, int kLayers>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    backward_kernel(const __grid_constant__ BackwardLaunch<scalar_t, acc_t, kLayers> p) {
  using Layer = LayerBackward<scalar_t, acc_t>;
  if (p.first_step == 0) {  // lambda's partial sums; a dense layer's whole backward
    for_each_virtual_block(
        p.layers, p.count, [](const Layer& L) { return L.blocks; }, false,
        [&](const Layer& L, int64_t local) {
          const block_walk::Range piece = block_walk::piece(L.numel, L.chunk, local);
          const acc_t sum = block_sum(lambda_share<scalar_t, acc_t, index_t>(L, piece), ordered_sum_scratch<acc_t>());
          if (L.dense()) {
            correct<scalar_t, acc_t, index_t>(L, p.scaled, piece, local, sum);
          } else if (threadIdx.x == 0) {
            L.partial[local] = sum;
          }
        });
  }
  if (p.first_step + p.step_count < 2) return;
  if (p.first_step == 0) phase_barrier(p.one_block);
  // lambda's sum from the partial sums, then (G - lambda u v^T) / sigma, walked back
  for_each_virtual_block_of_layers(
      p.layers, p.count, [](const Layer& L) { return L.dense() ? int64_t{0} : L.blocks; }, true,
      [](const Layer& L) { return ordered_sum_block(L.blocks, [&](int64_t j) { return L.partial[j]; }); },
      [&](const Layer& L, int64_t local, acc_t sum) {
        correct<scalar_t, acc_t, index_t>(L, p.scaled, block_walk::piece(L.numel, L.chunk, local), local, sum);
      });
}

}  // namespace

void run_backward(const std::vector<BackwardLayer>& layers, const at::Tensor& sigmas,
                  const ScaledBackwardArgs* scaled) {
  TORCH_INTERNAL_ASSERT(scaled == nullptr || layers.size() == 1, "the scaled backward runs one layer");
  const at::Tensor& s0 = layers[0].s3;
  const auto acc_options = s0.options().dtype(sigmas.scalar_type());
  std::vector<int64_t> partial_offsets{0}, blocks;
  int64_t max_numel = 0;
  for (const BackwardLayer& layer : layers) {
    blocks.push_back(block_walk::lambda_blocks_for(layer.s3.numel(), static_cast<int>(layer.s3.element_size())));
    partial_offsets.push_back(partial_offsets.back() + blocks.back());
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
          if (scaled != nullptr) {
            p.scaled = {scaled_form_of<acc_t>(scaled->scaling), scaled->sigma_grad,
                        scaled->grad_gamma.mutable_data_ptr(), scaled->grad_gamma.scalar_type()};
          }
          int64_t wanted = 0;
          bool spread = false;
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
            L.v_order = block_walk::ColumnOrder::of(layer.column_groups,
                                                    layer.column_groups > 0 ? L.sv.cols() / layer.column_groups : 0);
            L.sigma = sigmas.const_data_ptr<acc_t>() + i;
            L.partial = workspace.mutable_data_ptr<acc_t>() + partial_offsets[i];
            L.numel = layer.s3.numel();
            L.blocks = blocks[i];
            L.chunk = block_walk::piece_chunk(L.numel, L.blocks, Pack<scalar_t>::kSize);
            L.lambda_packed = packable(layer.g3) && packable(layer.s3);
            L.elementwise_packed = packable(layer.g3) && packable(layer.out3);
            wanted += L.blocks;
            spread = spread || L.blocks > 1;
          }
          constexpr auto kernel = backward_kernel<scalar_t, acc_t, index_t, kLayers>;
          // Dense layers only: one phase, one ordinary launch of a block per layer.
          launch_steps<kernel>(p, spread ? 2 : 1, spread ? grid_blocks<kernel>(wanted) : p.count);
        }
      });
    });
  });
}

namespace {

// One layer's backward through its weight-shaped `weight` (W_sn, or the scaled backward's W), its arguments checked.
at::Tensor backward_of_one_layer(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u,
                                 const at::Tensor& v, const at::Tensor& sigma, int64_t dim, const MatrixShape& shape,
                                 const ScaledBackwardArgs* scaled) {
  const int64_t groups = memory_column_groups(weight, dim);
  WeightShapedOutput out(weight, shape, groups);
  // sigma is read by the kernel: bring it to the device and op-math dtype (a no-op for the forward's own sigma;
  // the CPU kernel's sigma.item() would be a host synchronization here).
  const at::Tensor sig = sigma.to(weight.options().dtype(sigma_dtype(weight.scalar_type()))).contiguous();
  run_backward({{as_matrix3d(grad, shape, groups), as_matrix3d(weight, shape, groups), out.view3d, u, v, groups}}, sig,
               scaled);
  return out.finish();
}

at::Tensor spectral_normalize_backward_cuda(const at::Tensor& grad, const at::Tensor& weight_sn, const at::Tensor& u,
                                            const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  const c10::cuda::CUDAGuard guard(weight_sn.device());
  const MatrixShape shape =
      check_backward_args("sn_ext::spectral_normalize_backward", grad, weight_sn, u, v, sigma, dim);
  return backward_of_one_layer(grad, weight_sn, u, v, sigma, dim, shape, nullptr);
}

// The same launch on W, gamma's gradient written by the kernel (in gamma's dtype and shape; sigma's dtype, 0-d,
// without gamma).
std::tuple<at::Tensor, at::Tensor> spectral_normalize_scaled_backward_cuda(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma,
    int64_t dim, std::optional<double> coeff, const std::optional<at::Tensor>& gamma, bool sigma_grad) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const Scaling scaling{coeff, gamma};
  const MatrixShape shape =
      check_scaled_backward_args("sn_ext::spectral_normalize_scaled_backward", grad, weight, u, v, sigma, dim, scaling);
  const at::Tensor grad_gamma =
      gamma.has_value() ? at::empty(gamma->sizes(), gamma->options().memory_format(at::MemoryFormat::Contiguous))
                        : at::empty({}, weight.options().dtype(sigma_dtype(weight.scalar_type())));
  const ScaledBackwardArgs scaled{scaling, sigma_grad, grad_gamma};
  return {backward_of_one_layer(grad, weight, u, v, sigma, dim, shape, &scaled), grad_gamma};
}

}  // namespace

TORCH_LIBRARY_IMPL(sn_ext, CUDA, m) {
  m.impl("spectral_normalize_backward", &spectral_normalize_backward_cuda);
  m.impl("spectral_normalize_scaled_backward", &spectral_normalize_scaled_backward_cuda);
}

}  // namespace sn_ext
