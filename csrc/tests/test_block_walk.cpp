// C++ check of the CUDA kernels' index math (csrc/cuda/block_walk.h), which no GPU has run: for random layer lists
// and grid sizes, every phase's walk visits each (layer, local block) exactly once; the split of a reduced dimension
// has non-empty pieces of whole packs that cover it. Exits non-zero on the first failure.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "../cuda/block_walk.h"

namespace {

struct Layer {
  int64_t first;   // the layer's first virtual block in the phase
  int64_t blocks;  // how many it has (0: none in this phase, as a layer without W / sigma)
};

int check_walks(std::mt19937_64& rng) {
  using sn_ext::block_walk::walk_virtual_blocks;
  std::uniform_int_distribution<int> layer_count(1, 12), small(0, 40), often_zero(0, 4);
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<Layer> layers(layer_count(rng));
    int64_t total = 0;
    for (Layer& layer : layers) {
      layer.first = total;
      layer.blocks = often_zero(rng) == 0 ? 0 : small(rng);
      total += layer.blocks;
    }
    const int64_t grid = std::uniform_int_distribution<int64_t>(1, total + 3)(rng);
    std::vector<std::vector<int>> visits(layers.size());
    for (size_t l = 0; l < layers.size(); ++l) visits[l].assign(layers[l].blocks, 0);
    bool in_range = true;
    for (int64_t block = 0; block < grid; ++block) {
      walk_virtual_blocks(layers.data(), static_cast<int>(layers.size()), &Layer::first, total, block, grid,
                          [&](const Layer& layer, int64_t local) {
                            const size_t l = static_cast<size_t>(&layer - layers.data());
                            if (local < 0 || local >= layer.blocks) {
                              in_range = false;
                            } else {
                              ++visits[l][local];
                            }
                          });
    }
    bool once = in_range;
    for (const std::vector<int>& v : visits)
      for (int count : v) once = once && count == 1;
    if (!once) {
      std::printf("FAIL walk: trial %d, %zu layers, %lld blocks, grid %lld\n", trial, layers.size(),
                  static_cast<long long>(total), static_cast<long long>(grid));
      return 1;
    }
  }
  std::printf("ok   walk: every (layer, local block) visited exactly once, 2000 random layer lists and grids\n");
  return 0;
}

int check_splits(std::mt19937_64& rng) {
  using sn_ext::block_walk::split_evenly;
  std::uniform_int_distribution<int64_t> reduced_of(1, 200000), splits_of(1, 300);
  const int64_t aligns[] = {1, 2, 4, 8};
  for (int trial = 0; trial < 20000; ++trial) {
    const int64_t reduced = reduced_of(rng), wanted = splits_of(rng), align = aligns[trial % 4];
    const sn_ext::block_walk::Split s = split_evenly(reduced, wanted, align);
    const bool ok = s.chunk % align == 0 && s.splits >= 1 && s.splits <= wanted && (s.splits - 1) * s.chunk < reduced &&
                    s.splits * s.chunk >= reduced;
    if (!ok) {
      std::printf("FAIL split: %lld into %lld (align %lld): %lld x %lld\n", static_cast<long long>(reduced),
                  static_cast<long long>(wanted), static_cast<long long>(align), static_cast<long long>(s.splits),
                  static_cast<long long>(s.chunk));
      return 1;
    }
  }
  std::printf("ok   split: pieces of whole packs, none empty, at most the splits asked for, covering the dimension\n");
  return 0;
}

}  // namespace

int main() {
  std::mt19937_64 rng(20261128);
  return check_walks(rng) | check_splits(rng);
}
