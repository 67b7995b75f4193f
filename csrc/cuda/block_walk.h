// The index math of the CUDA kernels' block walks and split plans (common.cuh) in plain C++, __host__ __device__
// under nvcc, so that csrc/tests/test_block_walk.cpp checks it on the CPU, where no GPU runs the kernels: which layer
// owns a phase's virtual block, the blocks each block of a grid of any size visits, and how a reduced dimension is
// cut into splits.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define SN_EXT_HOST_DEVICE __host__ __device__
#else
#define SN_EXT_HOST_DEVICE
#endif

namespace sn_ext {
namespace block_walk {

SN_EXT_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The layer that owns virtual block b of a phase, searching on from `layer` (b only grows within a phase). A layer
// with no blocks in the phase (its first equals the next layer's) owns none.
template <typename Layer>
SN_EXT_HOST_DEVICE inline int advance_layer(const Layer* layers, int count, int layer, int64_t b,
                                            int64_t Layer::* first) {
  while (layer + 1 < count && layers[layer + 1].*first <= b) ++layer;
  return layer;
}

// Block `block` of a grid of `blocks` takes the phase's virtual blocks b = block, block + blocks, ... < total, and
// calls body(layer, local) for each, where layer owns b (its blocks start at layer.*first) and local = b -
// layer.*first is the block's index within the layer (for_each_virtual_block: block = blockIdx.x, blocks =
// gridDim.x). The kernels' bodies are __device__ lambdas: the check that a __host__ __device__ function calls only
// what the host can is left out for this template, which the device code instantiates with them.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename Layer, typename Body>
SN_EXT_HOST_DEVICE inline void walk_virtual_blocks(const Layer* layers, int count, int64_t Layer::* first,
                                                   int64_t total, int64_t block, int64_t blocks, const Body& body) {
  int layer = 0;
  for (int64_t b = block; b < total; b += blocks) {
    layer = advance_layer(layers, count, layer, b, first);
    body(layers[layer], b - layers[layer].*first);
  }
}

// A reduced dimension of `reduced` elements cut into at most `splits` pieces of `chunk` elements (the last one
// shorter, never empty), chunk a whole number of `align` elements (16-byte packs: matvec_block's packed loop).
struct Split {
  int64_t splits, chunk;
};

SN_EXT_HOST_DEVICE inline Split split_evenly(int64_t reduced, int64_t splits, int64_t align) {
  const int64_t chunk = ceil_div(ceil_div(reduced, splits), align) * align;
  return {ceil_div(reduced, chunk), chunk};
}

}  // namespace block_walk
}  // namespace sn_ext
