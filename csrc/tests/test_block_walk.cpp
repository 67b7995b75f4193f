// C++ check of the CUDA kernels' index math and launch plans (csrc/cuda/block_walk.h), which no GPU has run: for
// random layer lists and grid sizes, every phase's walk visits each (layer, local block) exactly once, reversed in
// the opposite order; pieces cover their tensor; the fused round's row layout covers each column of a row exactly
// once, its row blocks each row, its column sums each column, its workspace parts do not overlap; its schedules run
// the passes, sums and finish in the documented order; the dense choices take small layers and leave large ones to
// the grid. Exits non-zero on the first failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../cuda/block_walk.h"

namespace {

using namespace sn_ext::block_walk;

struct Layer {
  int64_t blocks;  // how many virtual blocks it has in the phase (0: none, as a dense layer after the first phase)
};

int fail(const char* what, long long a = 0, long long b = 0, long long c = 0, long long d = 0) {
  std::printf("FAIL %s: %lld %lld %lld %lld\n", what, a, b, c, d);
  return 1;
}

int check_walks(std::mt19937_64& rng) {
  std::uniform_int_distribution<int> layer_count(1, 12), small(0, 40), often_zero(0, 4);
  for (int trial = 0; trial < 4000; ++trial) {
    std::vector<Layer> layers(layer_count(rng));
    int64_t total = 0;
    for (Layer& layer : layers) {
      layer.blocks = often_zero(rng) == 0 ? 0 : small(rng);
      total += layer.blocks;
    }
    const int64_t grid = std::uniform_int_distribution<int64_t>(1, total + 3)(rng);
    const bool reversed = trial % 2 == 1;
    std::vector<std::vector<int>> visits(layers.size());
    for (size_t l = 0; l < layers.size(); ++l) visits[l].assign(layers[l].blocks, 0);
    bool ok = true;
    for (int64_t block = 0; block < grid; ++block) {
      int64_t previous = reversed ? total : -1;  // the global index of the block's last visit
      walk_virtual_blocks(
          layers.data(), static_cast<int>(layers.size()), [](const Layer& L) { return L.blocks; }, block, grid,
          reversed,
          [&](const Layer& layer, int64_t local) {
            const size_t l = static_cast<size_t>(&layer - layers.data());
            if (local < 0 || local >= layer.blocks) {
              ok = false;
              return;
            }
            ++visits[l][local];
            int64_t global = local;
            for (size_t k = 0; k < l; ++k) global += layers[k].blocks;
            // each block takes b = block, block + grid, ...: in that order, or its reverse
            ok = ok && global % grid == block && (reversed ? global < previous : global > previous);
            previous = global;
          });
    }
    for (const std::vector<int>& v : visits)
      for (int count : v) ok = ok && count == 1;
    if (!ok) return fail("walk", trial, static_cast<long long>(layers.size()), total, grid);
  }
  std::printf("ok   walk: every (layer, local block) once, in the block's order or its reverse (4000 lists, grids)\n");
  return 0;
}

int check_splits(std::mt19937_64& rng) {
  std::uniform_int_distribution<int64_t> reduced_of(1, 200000), splits_of(1, 300);
  const int64_t aligns[] = {1, 2, 4, 8};
  for (int trial = 0; trial < 20000; ++trial) {
    const int64_t reduced = reduced_of(rng), wanted = splits_of(rng), align = aligns[trial % 4];
    const Split s = split_evenly(reduced, wanted, align);
    const bool ok = s.chunk % align == 0 && s.splits >= 1 && s.splits <= wanted && (s.splits - 1) * s.chunk < reduced &&
                    s.splits * s.chunk >= reduced;
    if (!ok) return fail("split", reduced, wanted, align, s.chunk);
    // pieces: whole units, covering [0, n) once
    const int64_t chunk = piece_chunk(reduced, wanted, align);
    int64_t next = 0;
    for (int64_t i = 0; i < wanted; ++i) {
      const Range r = piece(reduced, chunk, i);
      const bool aligned = r.begin == r.end || r.begin % align == 0;  // an empty piece past the end starts at n
      if (r.begin != next || r.end < r.begin || !aligned) return fail("piece", reduced, wanted, i, chunk);
      next = r.end;
    }
    if (next != reduced) return fail("pieces cover", reduced, wanted, next);
  }
  std::printf("ok   split, piece: whole packs, none empty, at most the splits asked for, covering the dimension\n");
  return 0;
}

template <int kUnits, int kUnit>
bool columns_covered(const FusedPlan& p, int64_t cols) {
  // every column of a row is held by exactly one (segment, element, thread of the row group)
  std::vector<int> held(cols, 0);
  for (int64_t s = 0; s < p.segments; ++s)
    for (int e = 0; e < kUnits * kUnit; ++e)
      for (int tx = 0; tx < p.threads; ++tx) {
        const int64_t c = element_column<kUnits, kUnit>(s, e, p.threads, tx);
        if (c < cols) ++held[c];
      }
  for (int count : held)
    if (count != 1) return false;
  return true;
}

bool covered(const FusedPlan& p, int64_t cols) {
  // (units, unit) of fused_layout: packed float/bf16/f64 (4, 4), (2, 8), (4, 2); element-wise (4, 1), (2, 1)
  if (p.unit == 4) return columns_covered<4, 4>(p, cols);
  if (p.unit == 8) return columns_covered<2, 8>(p, cols);
  if (p.unit == 2) return columns_covered<4, 2>(p, cols);
  if (p.units == 4) return columns_covered<4, 1>(p, cols);
  return columns_covered<2, 1>(p, cols);
}

int check_fused_plans(std::mt19937_64& rng) {
  std::uniform_int_distribution<int> log_rows(0, 15), log_cols(0, 16);
  const int itemsizes[] = {4, 2, 8};
  for (int trial = 0; trial < 3000; ++trial) {
    const int64_t rows = std::uniform_int_distribution<int64_t>(1, int64_t(1) << log_rows(rng))(rng);
    const int itemsize = itemsizes[trial % 3], pack = 16 / itemsize;
    int64_t cols = std::uniform_int_distribution<int64_t>(1, int64_t(1) << log_cols(rng))(rng);
    const bool packed = trial % 4 != 0;
    if (packed) cols = (cols + pack - 1) / pack * pack;
    const FusedPlan p = plan_fused(rows, cols, itemsize, packed);
    const int acc = itemsize == 8 ? 8 : 4;
    bool ok =
        p.units * p.unit * acc == (packed ? kFusedBytes : kFusedElementwiseBytes) && (p.unit == (packed ? pack : 1));
    ok = ok && p.threads >= 1 && p.threads <= kThreads && (p.threads & (p.threads - 1)) == 0 &&
         p.threads * p.rows_per_step == kThreads;
    ok = ok && p.segments * p.threads * p.units * p.unit >= cols && (p.segments == 1 || p.threads == kThreads) &&
         (p.segments - 1) * p.threads * p.units * p.unit < cols;
    ok = ok && p.rows_per_block % p.rows_per_step == 0 && p.blocks * p.rows_per_block >= rows &&
         (p.blocks - 1) * p.rows_per_block < rows && p.blocks <= kTargetBlocks;
    ok = ok && (rows > p.rows_per_step || p.dense());  // one step of rows: dense
    if (!p.dense()) {
      ok =
          ok && p.reduce_groups >= 1 && p.reduce_groups <= kReduceMaxGroups &&
          (p.reduce_groups & (p.reduce_groups - 1)) == 0 &&
          ceil_div(p.blocks, p.reduce_groups) <= std::max<int64_t>(kReducePerThread, p.blocks / kReduceMaxGroups + 1) &&
          p.reduce_blocks * p.reduce_columns() >= cols && (p.reduce_blocks - 1) * p.reduce_columns() < cols;
    } else {
      ok = ok && p.reduce_blocks == 0;
    }
    if (!ok) return fail("fused plan", rows, cols, itemsize, packed);
    if (trial % 10 == 0 && !covered(p, cols)) return fail("fused columns", rows, cols, itemsize, packed);
    const FusedWorkspace ws = fused_workspace(rows, cols, p);
    ok = ws.z == rows && ws.partial == rows + cols && ws.y_squares == ws.partial + (p.dense() ? 0 : p.blocks * cols) &&
         ws.z_squares == ws.y_squares + p.blocks && ws.size == ws.z_squares + z_square_count(p);
    if (!ok) return fail("fused workspace", rows, cols, itemsize, packed);
  }
  std::printf("ok   fused plans: layouts cover each column once, row blocks each row, column sums each column\n");
  return 0;
}

int check_schedules() {
  for (int64_t n = 0; n <= 4; ++n)
    for (int v_first = 0; v_first <= 1; ++v_first)
      for (int dense = 0; dense <= 1; ++dense) {
        const int64_t steps = fused_steps(n, v_first, dense);
        std::vector<FusedStep> s;
        for (int64_t k = 0; k < steps; ++k) s.push_back(fused_step(k, n, v_first, dense));
        bool ok = s.back().phase == FusedPhase::kFinish && s.front().phase == FusedPhase::kPass && s.front().from_input;
        int passes = 0;
        for (int64_t k = 0; k < steps; ++k) {
          if (s[k].phase == FusedPhase::kPass) {
            ++passes;
            ok = ok && s[k].from_input == (k == 0);  // only the first pass reads the caller's vector
            // a pass is followed by its sums (spread), except the last y-only pass, which the finish follows
            const bool sums_next = k + 1 < steps && s[k + 1].phase == FusedPhase::kSums;
            ok = ok && (sums_next == (!dense && s[k].pass != Pass::kY));
          }
          if (s[k].phase == FusedPhase::kSums) {
            ok = ok && !dense && k > 0 && s[k - 1].phase == FusedPhase::kPass;
            ok = ok && s[k].divide_y == (s[k - 1].pass == Pass::kFused);
          }
        }
        if (n == 0) {
          ok = ok && steps == 2 && s[0].pass == Pass::kY && s[0].dot && s[1].dot;
        } else if (v_first) {
          // W^T u, then n - 1 fused passes, then W v: n + 1 passes; the first z only, the last y only
          ok = ok && passes == n + 1 && s[0].pass == Pass::kZ && s[steps - 2].pass == Pass::kY;
          ok = ok && steps == (dense ? n + 2 : 2 * n + 2);
        } else {
          ok = ok && passes == n && s[0].pass == Pass::kFused && steps == (dense ? n + 1 : 2 * n + 1);
          for (const FusedStep& step : s) ok = ok && (step.phase != FusedPhase::kPass || step.pass == Pass::kFused);
        }
        if (!ok) return fail("schedule", n, v_first, dense);
      }
  // A launch of layers of both orders and kinds: each runs each of its steps once, in order, in consecutive phases;
  // every spread layer finishes in the launch's last phase, every dense one starts in its first.
  for (int64_t n = 0; n <= 4; ++n) {
    int64_t steps = 0;
    for (int kind = 0; kind < 4; ++kind) steps = std::max(steps, fused_steps(n, kind & 1, kind & 2));
    for (int kind = 0; kind < 4; ++kind) {
      const bool v_first = kind & 1, dense = kind & 2;
      int64_t next = 0, last_phase = -1;
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t t = layer_step(s, steps, n, v_first, dense);
        if (t < 0) continue;
        if (t != next++ || (last_phase >= 0 && s != last_phase + 1)) return fail("layer step", n, kind, s, t);
        if (t == 0 && dense && s != 0) return fail("dense start", n, kind, s);
        last_phase = s;
      }
      if (next != fused_steps(n, v_first, dense)) return fail("layer steps", n, kind, next);
      if (!dense && last_phase != steps - 1) return fail("spread finish", n, kind, last_phase);
    }
  }
  // A launch of dense layers of both orders, its blocks working alone: block l does layer l's every step.
  const FusedPlan dense = plan_fused(64, 27, 4, false);
  if (!dense.dense()) return fail("dense plan");
  struct DenseLayer {
    bool v_first;
  };
  for (int64_t n = 0; n <= 3; ++n) {
    const std::vector<DenseLayer> layers = {{false}, {true}, {false}, {true}, {true}};
    const int64_t steps = fused_steps(n, true, true);
    for (int64_t s = 0; s < steps; ++s)
      for (int64_t block = 0; block < static_cast<int64_t>(layers.size()); ++block) {
        bool ok = true;
        walk_virtual_blocks(
            layers.data(), static_cast<int>(layers.size()),
            [&](const DenseLayer& L) {
              return phase_blocks(dense, layer_step(s, steps, n, L.v_first, true), n, L.v_first, true);
            },
            block, static_cast<int64_t>(layers.size()), s == steps - 1,
            [&](const DenseLayer& L, int64_t local) { ok = ok && &L - layers.data() == block && local == 0; });
        if (!ok) return fail("dense blocks keep their layers", n, s, block);
      }
  }
  std::printf("ok   schedules: u-first (pass | sums) x n | finish; v-first z-pass .. y-pass | finish; n = 0; mixed\n");
  return 0;
}

int check_column_orders(std::mt19937_64& rng) {
  // The division by a multiply: every divisor's quotients at the edges and at random numerators below 2^31.
  std::uniform_int_distribution<uint32_t> any_n(0, (uint32_t(1) << 31) - 1);
  std::vector<uint32_t> divisors;
  for (uint32_t d = 1; d <= 4096; ++d) divisors.push_back(d);
  for (int k = 0; k < 2000; ++k)
    divisors.push_back(std::uniform_int_distribution<uint32_t>(1, (uint32_t(1) << 31) - 1)(rng));
  for (int b = 12; b <= 31; ++b)
    divisors.insert(divisors.end(), {(uint32_t(1) << b) - 1, uint32_t(1) << b, (uint32_t(1) << b) + 1});
  for (const uint32_t d : divisors) {
    if (d >= (uint32_t(1) << 31)) continue;
    const FastDivisor f = FastDivisor::of(d);
    std::vector<uint32_t> ns = {0, 1, d - 1, d, d + 1, 2 * d - 1, (uint32_t(1) << 31) - 1, (uint32_t(1) << 31) - d};
    for (int k = 0; k < 200; ++k) ns.push_back(any_n(rng));
    for (const uint32_t n : ns)
      if (n < (uint32_t(1) << 31) && f.quotient(n) != n / d) return fail("fast division", n, d, f.quotient(n));
  }
  // A transposed column order is a permutation: memory column m of a channels_last (O, I, kh, kw) weight holds
  // torch's column (m % I) * S + m / I.
  for (const auto& [groups, per_group] : std::vector<std::pair<int64_t, int64_t>>{
           {3, 9}, {64, 9}, {512, 9}, {1, 16}, {7, 1}, {128, 16}, {3, 27}, {1000, 49}}) {
    const ColumnOrder order = ColumnOrder::of(groups, per_group);
    std::vector<int> seen(groups * per_group, 0);
    for (int64_t m = 0; m < groups * per_group; ++m) {
      const int64_t c = order.logical(m);
      if (c != (m % groups) * per_group + m / groups) return fail("column order", groups, per_group, m, c);
      ++seen[c];
    }
    for (const int count : seen)
      if (count != 1) return fail("column order permutation", groups, per_group);
  }
  if (!ColumnOrder::of(0, 0).in_order() || ColumnOrder::of(0, 0).logical(12345) != 12345) return fail("in order");
  std::printf("ok   column orders: the division by a multiply, transposed columns a permutation\n");
  return 0;
}

int check_dense_choices() {
  struct Case {
    int64_t rows, cols;
    bool dense;
  };
  // sngan's smallest layers run dense (one block, no grid barrier); large ones spread over the grid
  const Case forward[] = {{64, 27, true},   {1, 8192, true},    {128, 1, true},      {1, 18432, true},
                          {256, 128, true}, {512, 4608, false}, {4096, 4096, false}, {16384, 128, false}};
  for (const Case& c : forward) {
    if (plan_fused(c.rows, c.cols, 4, c.cols % 4 == 0).dense() != c.dense) return fail("dense forward", c.rows, c.cols);
  }
  if (lambda_blocks_for(1728, 4) != 1 || lambda_blocks_for(8192, 4) != 1 || lambda_blocks_for(4096 * 4096, 4) == 1)
    return fail("dense backward");
  for (int64_t numel = 1; numel < (int64_t(1) << 26); numel = numel * 3 + 1) {
    const int64_t blocks = lambda_blocks_for(numel, 4);
    if (blocks < 1 || blocks > kMaxLambdaBlocks) return fail("lambda blocks", numel, blocks);
  }
  std::printf("ok   dense choices: small layers in one block, large ones over the grid\n");
  return 0;
}

// `--plans`: for each line "rows cols itemsize packed" on stdin, the fused plan's fields and the backward's pieces
// (tests/test_benchmarks.py compares them with benchmarks/cuda_plan.py's mirror).
int print_plans() {
  long long rows, cols;
  int itemsize, packed;
  while (std::scanf("%lld %lld %d %d", &rows, &cols, &itemsize, &packed) == 4) {
    const FusedPlan p = plan_fused(rows, cols, itemsize, packed != 0);
    std::printf("%d %d %d %d %lld %lld %lld %d %lld %lld\n", p.unit, p.units, p.threads, p.rows_per_step,
                static_cast<long long>(p.segments), static_cast<long long>(p.rows_per_block),
                static_cast<long long>(p.blocks), p.reduce_groups, static_cast<long long>(p.reduce_blocks),
                static_cast<long long>(lambda_blocks_for(rows * cols, itemsize)));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--plans") return print_plans();
  std::mt19937_64 rng(20261128);
  return check_walks(rng) | check_splits(rng) | check_fused_plans(rng) | check_schedules() | check_column_orders(rng) |
         check_dense_choices();
}
