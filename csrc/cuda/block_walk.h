// The index math and launch plans of the CUDA kernels (common.cuh, fused_round.cuh) in plain C++, __host__ __device__
// under nvcc, so that csrc/tests/test_block_walk.cpp checks it on the CPU, where no GPU runs the kernels: which layer
// owns a phase's virtual block, the blocks each block of a grid of any size visits (in either order), how a reduced
// dimension is cut into splits, the fused round's row layout and row blocks, and which layers a launch runs "dense"
// (a whole layer in one block) because the device-time model says so.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define SN_EXT_HOST_DEVICE __host__ __device__
#else
#define SN_EXT_HOST_DEVICE
#endif

namespace sn_ext {
namespace block_walk {

// Threads per block, for every phase (a block sum's order depends on the block size, so one size makes a layer's
// bits the same whether it is launched alone or in a group).
constexpr int kThreads = 256;
// About how many blocks a phase of one layer should have to fill an H100/H200 (132 SMs x 3 resident blocks). A
// constant, not the device's SM count, so that the split of every sum (and every result bit) depends on the shape
// only.
constexpr int64_t kTargetBlocks = 256;

SN_EXT_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Smallest power of 2 >= n, capped at `cap` (a power of 2).
SN_EXT_HOST_DEVICE inline int pow2_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) p <<= 1;
  return p;
}

SN_EXT_HOST_DEVICE inline int64_t max3(int64_t a, int64_t b, int64_t c) {
  const int64_t ab = a > b ? a : b;
  return ab > c ? ab : c;
}

// ---------------------------------------------------------------------------------------------------------------
// Column orders. A weight seen through dim 0 whose memory holds dim 1 innermost (a channels_last convolution weight:
// (O, kh, kw, I) in memory) has contiguous rows, each holding its columns in another order: torch's column
// c = i * S + s (S = kh * kw) lies at memory column m = s * I + i. The kernels read such a weight as the contiguous
// matrix of its memory order (no copy) and find v's element of memory column m at logical(m) = (m % I) * S + m / I.

// The high 32 bits of a * b.
SN_EXT_HOST_DEVICE inline uint32_t mul_high(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// n / d for 0 <= n < 2^31 by a multiply and a shift (d >= 1; the multiplier of Granlund and Montgomery's "Division
// by invariant integers using multiplication", as CUTLASS's FastDivmod): an integer division costs tens of
// instructions, and the fused pass takes one per element of x it reads.
struct FastDivisor {
  uint32_t d, mul, shr;
  static FastDivisor of(uint32_t d) {
    if (d == 1) return {1, 0, 0};
    uint32_t log2 = 0;  // ceil(log2(d))
    while ((uint64_t(1) << log2) < d) ++log2;
    const uint32_t p = 31 + log2;
    return {d, static_cast<uint32_t>(((uint64_t(1) << p) + d - 1) / d), p - 32};
  }
  SN_EXT_HOST_DEVICE uint32_t quotient(uint32_t n) const { return d == 1 ? n : mul_high(n, mul) >> shr; }
};

struct ColumnOrder {
  FastDivisor groups;  // I; d == 0: the columns are in order
  uint32_t per_group;  // S
  // groups x per_group columns stored transposed; in order for groups == 0.
  static ColumnOrder of(int64_t groups, int64_t per_group) {
    if (groups == 0) return {{0, 0, 0}, 0};
    return {FastDivisor::of(static_cast<uint32_t>(groups)), static_cast<uint32_t>(per_group)};
  }
  SN_EXT_HOST_DEVICE bool in_order() const { return groups.d == 0; }
  SN_EXT_HOST_DEVICE int64_t logical(int64_t m) const {
    if (in_order()) return m;
    const uint32_t q = groups.quotient(static_cast<uint32_t>(m));
    return static_cast<int64_t>(static_cast<uint32_t>(m) - q * groups.d) * per_group + q;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Walks. A phase's virtual blocks are its layers' blocks one after another: layer l has blocks_of(layers[l]) of them
// (0: none in this phase). Block `block` of a grid of `blocks` takes the virtual blocks b = block, block + blocks,
// ... < total, and calls body(layer, local) for each, where local is b's index within its layer
// (for_each_virtual_block: block = blockIdx.x, blocks = gridDim.x). `reversed` takes the same blocks last first: a
// phase that re-reads what the previous one read walks back over it, finding the most recently read data still in L2
// (and L1). The kernels' bodies are __device__ lambdas: the check that a __host__ __device__ function calls only what
// the host can is left out for these templates, which the device code instantiates with them.

template <typename Layer, typename Count>
SN_EXT_HOST_DEVICE inline int64_t total_blocks(const Layer* layers, int count, const Count& blocks_of) {
  int64_t total = 0;
  for (int l = 0; l < count; ++l) total += blocks_of(layers[l]);
  return total;
}

// The layer that owns virtual block b, and b's index within it (`b` is replaced by it): a scan from the first layer,
// so that nothing but b stays live across a walk's body (the phases need the registers). `count` when no layer does.
template <typename Layer, typename Count>
SN_EXT_HOST_DEVICE inline int owner_of(const Layer* layers, int count, const Count& blocks_of, int64_t& b) {
  int layer = 0;
  for (; layer < count; ++layer) {
    const int64_t blocks = blocks_of(layers[layer]);
    if (b < blocks) break;
    b -= blocks;
  }
  return layer;
}

// A phase's virtual blocks number fewer than 2^31 (kGroupLayers layers of at most kTargetBlocks-odd blocks per phase,
// or kMaxLambdaBlocks): the walks count them in 32 bits (one register less in the phases' loops).
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename Layer, typename Count, typename Body>
SN_EXT_HOST_DEVICE inline void walk_virtual_blocks(const Layer* layers, int count, const Count& blocks_of, int block,
                                                   int blocks, bool reversed, const Body& body) {
  if (!reversed) {
    for (int b = block;; b += blocks) {
      int64_t local = b;
      const int layer = owner_of(layers, count, blocks_of, local);
      if (layer == count) return;
      body(layers[layer], local);
    }
  }
  const int total = static_cast<int>(total_blocks(layers, count, blocks_of));
  if (block >= total) return;
  for (int b = block + (total - 1 - block) / blocks * blocks; b >= block; b -= blocks) {
    int64_t local = b;
    const int layer = owner_of(layers, count, blocks_of, local);
    body(layers[layer], local);
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

// Piece `index` [begin, end) of `n` elements cut into pieces of `chunk` elements (empty past the end): an
// element-wise pass's virtual block (W / sigma: a block of rows' elements; <G, W_sn> and the correction:
// piece_chunk's).
struct Range {
  int64_t begin, end;
};

SN_EXT_HOST_DEVICE inline Range piece(int64_t n, int64_t chunk, int64_t index) {
  const int64_t begin = index * chunk < n ? index * chunk : n;
  return {begin, begin + chunk < n ? begin + chunk : n};
}

// The chunk that cuts `n` elements into at most `pieces` pieces of whole `align`-element units.
SN_EXT_HOST_DEVICE inline int64_t piece_chunk(int64_t n, int64_t pieces, int64_t align) {
  return ceil_div(ceil_div(n, pieces), align) * align;
}

// ---------------------------------------------------------------------------------------------------------------
// The device-time model (benchmarks/device_model.py) for the choices below, which trade a longer chain in one block
// against more blocks with grid-wide barriers between them (benchmarks/cuda_plan.py mirrors them). The choices fix
// how sums are split, and so the result bits: they depend on the shape alone, never on the device, and weigh a
// plan's time in each of the model's scenarios: its latencies (ns) at the low and at the high end of their ranges, on
// an H100 and on an H200 (copy bandwidth, read + write, bytes per ns). W is read from L2 again where W and W_sn fit in
// the smaller L2 (the H100's).
struct Scenario {
  double l2, dram, block_sum, sync, grid_barrier, copy_bytes_per_ns;
};
constexpr Scenario kScenarios[4] = {
    {150, 700, 200, 50, 1000, 3000},
    {300, 1200, 300, 75, 2000, 3000},
    {150, 700, 200, 50, 1000, 4300},
    {300, 1200, 300, 75, 2000, 4300},
};
constexpr double kL2Bytes = 50e6;
// Resident blocks of a nominal H100/H200 grid (132 SMs x 2, common.cuh's kMinBlocksPerSm): blocks beyond it run as
// later waves.
constexpr int64_t kNominalGrid = 264;
// 16-byte packs a thread of an element-wise pass loads before it uses any (elementwise.cuh), of its one tensor (W /
// sigma, the correction: 64 bytes in flight per thread) or of each of two (<G, W_sn>: 128 bytes).
constexpr int kStreamPacks = 4;
constexpr int kStreamPairPacks = 4;
// Elements of u or v a thread of the fused round's finish loads before it stores any (fused_round.cuh's
// finish_elements).
constexpr int kVectorBatch = 8;

inline double at_least(double chain_ns, double bytes, const Scenario& x) {
  return chain_ns > bytes / x.copy_bytes_per_ns ? chain_ns : bytes / x.copy_bytes_per_ns;
}

// Round trips of a block's threads streaming `elements` (`packs` packs of `unit` elements in flight each).
inline double stream_trips(int64_t elements, int64_t unit, int packs = kStreamPacks) {
  return static_cast<double>(ceil_div(ceil_div(elements, unit), int64_t(kThreads) * packs));
}

// ---------------------------------------------------------------------------------------------------------------
// The fused round's plan (fused_round.cuh) for a layer of rows x cols elements of `itemsize` bytes.
//
// Row layout. A thread holds `units` adjacent loads of a row (one address per row, the loads at constant offsets from
// it), each a 16-byte pack of `unit` elements where every thread's packs of a row are contiguous and aligned
// (`packed`), else `unit` = 1 element: kFusedBytes of op-math sums per thread (kFusedElementwiseBytes element-wise,
// where each element has its own address and row steps are rare). `threads` threads (a power of 2) share a row, and a
// block
// steps over `rows_per_step` = kThreads / threads rows at a time, two steps together (their loads in flight at once,
// then one combined sum: shuffles only where a row fits in a warp, else one __syncthreads). A row of more than
// kThreads x units loads has `segments` > 1 ("wide"): its block reads it for y, then again a segment at a time for z
// (from L1/L2).
//
// Row blocks. A block owns `rows_per_block` rows (whole steps) and writes one partial z row, which the column sums
// (column_sums_block) add up: `reduce_groups` threads per column, kReducePerThread partial rows each at most. The
// rows per block are what the model finds fastest (spread_forward_ns), from one step or rows / kTargetBlocks up;
// `blocks` == 1 is a dense layer: its block runs the whole forward (every round, z, the normalizations and W / sigma)
// with no grid-wide barrier, chosen where that chain is shorter than the grid's, and always for one step of rows.
constexpr int kFusedBytes = 64;
constexpr int kFusedElementwiseBytes = 16;
constexpr int kReducePerThread = 8;
constexpr int kReduceMaxGroups = 32;

struct FusedPlan {
  int unit, units, threads, rows_per_step;
  int64_t segments, rows_per_block, blocks;
  int reduce_groups;
  int64_t reduce_blocks;  // the column sums' virtual blocks (0 for a dense layer: its block finishes z itself)
  SN_EXT_HOST_DEVICE bool dense() const { return blocks == 1; }
  SN_EXT_HOST_DEVICE int64_t reduce_columns() const { return kThreads / reduce_groups; }
  SN_EXT_HOST_DEVICE int64_t steps() const { return rows_per_block / rows_per_step; }
};

inline FusedPlan fused_layout(int64_t cols, int itemsize, bool packed) {
  FusedPlan p{};
  const int acc = itemsize == 8 ? 8 : 4;  // op-math bytes
  p.unit = packed ? 16 / itemsize : 1;
  p.units = (packed ? kFusedBytes : kFusedElementwiseBytes) / acc / p.unit;
  const int64_t col_units = ceil_div(cols, p.unit);
  p.threads = pow2_at_least(ceil_div(col_units, p.units), kThreads);
  p.rows_per_step = kThreads / p.threads;
  p.segments = ceil_div(col_units, int64_t(p.threads) * p.units);
  return p;
}

// `layout` with rows_per_block >= `min_rows` rows (rounded up to whole steps) and its column sums' plan.
inline FusedPlan with_row_blocks(FusedPlan p, int64_t rows, int64_t cols, int64_t min_rows) {
  p.rows_per_block =
      ceil_div(min_rows > p.rows_per_step ? min_rows : p.rows_per_step, p.rows_per_step) * p.rows_per_step;
  p.blocks = ceil_div(rows, p.rows_per_block);
  p.reduce_groups = p.blocks == 1 ? 1 : pow2_at_least(ceil_div(p.blocks, kReducePerThread), kReduceMaxGroups);
  p.reduce_blocks = p.blocks == 1 ? 0 : ceil_div(cols, p.reduce_columns());
  return p;
}

// The chain of a block's fused pass over `rows` of its rows, one round trip `trip_ns`: v's share (an L2 round trip),
// per two steps their loads and one sum (a wide row: its segments' loads, one sum, then its segments again from
// L1/L2 for z), the row groups' z sums combined and |y|^2.
inline double fused_pass_ns(const FusedPlan& p, int64_t rows, double trip_ns, const Scenario& x) {
  const int64_t pairs = ceil_div(ceil_div(rows, p.rows_per_step), 2);
  double ns = x.l2 + 2 * x.sync + x.block_sum;
  if (p.segments == 1) return ns + pairs * (trip_ns + (p.threads > 32 ? x.sync : 0));
  return ns + pairs * (p.segments * trip_ns + x.sync) + x.sync + pairs * p.segments * x.l2;
}

// A dense layer's forward (one block; u-first, one round): the pass from L2 (a small layer's W is there from its
// last use), |y| and |z| (a round trip), then u, v and W / sigma.
inline double dense_forward_ns(const FusedPlan& p, int64_t rows, int64_t cols, int itemsize, const Scenario& x) {
  const double finish_trips = stream_trips(rows * cols, 16 / itemsize) + stream_trips(rows, 1, kVectorBatch) +
                              stream_trips(cols, 1, kVectorBatch);
  return fused_pass_ns(p, rows, x.l2, x) + x.l2 + finish_trips * x.l2;
}

// The same layer spread over a grid: the pass (from DRAM; its bytes: W, twice for wide rows, and the partial z rows
// written), the column sums (|y|, the partial rows, the tree over the groups, |z|^2's share; the partial rows read),
// the normalizations and W / sigma (|y| and |z|, then the block's rows of W, from L2 where W and W_sn fit, else
// DRAM; W read and W_sn written), two grid-wide barriers.
inline double spread_forward_ns(const FusedPlan& p, int64_t rows, int64_t cols, int itemsize, const Scenario& x) {
  const int acc = itemsize == 8 ? 8 : 4;
  const double w = static_cast<double>(rows) * cols * itemsize;
  const double partial = static_cast<double>(p.blocks) * cols * acc;
  const double pass =
      at_least(fused_pass_ns(p, p.rows_per_block, x.dram, x), (p.segments > 1 ? 2 : 1) * w + partial, x);
  const double reduce_waves = static_cast<double>(ceil_div(p.reduce_blocks, kNominalGrid));
  const double per_thread = static_cast<double>(ceil_div(ceil_div(p.blocks, p.reduce_groups), 4));
  const double reduce =
      at_least(x.l2 + x.block_sum + reduce_waves * (per_thread * x.l2 + 3 * x.sync + x.block_sum), partial, x);
  const double waves = static_cast<double>(ceil_div(p.blocks, kNominalGrid));
  const double divide_trips = waves * stream_trips(p.rows_per_block * cols, 16 / itemsize);
  const double divide_ns = 2 * w <= kL2Bytes ? x.l2 : x.dram;
  const double normalize = at_least(x.l2 + x.block_sum + divide_trips * divide_ns, 2 * w, x);
  return pass + reduce + normalize + 2 * x.grid_barrier;
}

// A plan's time summed over the model's scenarios.
template <typename Time>
inline double in_all_scenarios(const Time& time) {
  double ns = 0;
  for (const Scenario& x : kScenarios) ns += time(x);
  return ns;
}

inline FusedPlan plan_fused(int64_t rows, int64_t cols, int itemsize, bool packed) {
  const FusedPlan layout = fused_layout(cols, itemsize, packed);
  FusedPlan best = with_row_blocks(layout, rows, cols, rows);
  if (rows <= layout.rows_per_step) return best;
  double best_ns = in_all_scenarios([&](const Scenario& x) { return dense_forward_ns(best, rows, cols, itemsize, x); });
  for (int64_t min_rows = ceil_div(rows, kTargetBlocks);; min_rows *= 2) {
    const FusedPlan spread = with_row_blocks(layout, rows, cols, min_rows);
    if (spread.blocks == 1) break;
    const double ns =
        in_all_scenarios([&](const Scenario& x) { return spread_forward_ns(spread, rows, cols, itemsize, x); });
    if (ns < best_ns) {
      best = spread;
      best_ns = ns;
    }
  }
  return best;
}

// A layer's fused-round workspace (acc_t offsets): y (rows) | z (cols) | the blocks' partial z rows (blocks x cols;
// none for a dense layer) | |y|^2's shares (one per block of rows; u . y's for n = 0) | |z|^2's shares (one per
// column-sums block; one for a dense layer).
struct FusedWorkspace {
  int64_t z, partial, y_squares, z_squares, size;
};

SN_EXT_HOST_DEVICE inline int64_t z_square_count(const FusedPlan& p) {
  return p.dense() ? 1 : p.reduce_blocks;
}

SN_EXT_HOST_DEVICE inline FusedWorkspace fused_workspace(int64_t rows, int64_t cols, const FusedPlan& p) {
  FusedWorkspace ws;
  ws.z = rows;
  ws.partial = ws.z + cols;
  ws.y_squares = ws.partial + (p.dense() ? 0 : p.blocks * cols);
  ws.z_squares = ws.y_squares + p.blocks;
  ws.size = ws.z_squares + z_square_count(p);
  return ws;
}

// The first column of this thread's unit k in segment s: unit (s * threads + tx) * kUnits + k of the row (a thread's
// units are adjacent, a row group's threads adjacent runs of them: coalesced), and of its element e.
template <int kUnits, int kUnit>
SN_EXT_HOST_DEVICE inline int64_t unit_column(int64_t s, int k, int threads, int tx) {
  return ((s * threads + tx) * kUnits + k) * static_cast<int64_t>(kUnit);
}

template <int kUnits, int kUnit>
SN_EXT_HOST_DEVICE inline int64_t element_column(int64_t s, int e, int threads, int tx) {
  return unit_column<kUnits, kUnit>(s, e / kUnit, threads, tx) + e % kUnit;
}

// The kinds of pass over W (fused_round.cuh): y and z together, y alone, z alone (u given).
enum class Pass : int { kFused, kY, kZ };

// The fused round's schedules (fused_round.cuh): step s of a layer's forward, spread over the grid or dense (in one
// block: no sums steps).

enum class FusedPhase : int { kPass, kSums, kFinish };

struct FusedStep {
  FusedPhase phase;
  Pass pass;        // kPass: which
  bool from_input;  // kPass: x (kZ: u) is the caller's vector; else x = N(z)
  bool dot;         // kPass (n = 0): u . y's shares; kFinish: sigma = u . y, no normalization
  bool divide_y;    // kSums: after a kFused pass, z = sums / max(|y|, eps)
  bool v_first;     // kFinish: sigma from |y| (v-first) or |z| (u-first)
};

SN_EXT_HOST_DEVICE inline int64_t fused_steps(int64_t n, bool v_first, bool dense) {
  if (n == 0) return 2;
  return (v_first ? n + 1 : n) + (dense ? 0 : n) + 1;
}

SN_EXT_HOST_DEVICE inline FusedStep fused_step(int64_t s, int64_t n, bool v_first, bool dense) {
  const int64_t last = fused_steps(n, v_first, dense) - 1;
  if (n == 0)
    return s == 0 ? FusedStep{FusedPhase::kPass, Pass::kY, true, true, false, false}
                  : FusedStep{FusedPhase::kFinish, Pass::kY, false, true, false, false};
  if (s == last) return {FusedPhase::kFinish, Pass::kY, false, false, false, v_first};
  if (v_first && s == last - 1) return {FusedPhase::kPass, Pass::kY, false, false, false, v_first};
  const int64_t round = dense ? s : s / 2;
  const bool z_only = v_first && round == 0;
  if (!dense && s % 2 == 1) return {FusedPhase::kSums, Pass::kFused, false, false, !z_only, v_first};
  return {FusedPhase::kPass, z_only ? Pass::kZ : Pass::kFused, round == 0, false, false, v_first};
}

// A layer's step in phase s of a fused launch of `steps` phases (the most any of its layers takes), or -1 where it
// has none: a launch runs layers of both orders and of both kinds, each on its own schedule (so with the bits of a
// launch of its own). A spread layer's schedule ends with the launch's last phase: every spread layer finishes
// there, the finish walking back over the blocks for all of them; a dense layer's starts with the first (its pass
// then shares a phase with the spread layers' first pass, not with their shorter sums).
SN_EXT_HOST_DEVICE inline int64_t layer_step(int64_t s, int64_t steps, int64_t n, bool v_first, bool dense) {
  const int64_t own = fused_steps(n, v_first, dense);
  const int64_t t = dense ? s : s - (steps - own);
  return t >= 0 && t < own ? t : -1;
}

// A layer's virtual blocks in phase s (its step t = layer_step(...), -1: none): the pass's and finish's row blocks,
// the sums' column blocks; a dense layer one. `independent`: the launch's blocks work alone (dense layers only, no
// grid-wide barrier between phases): a dense layer then keeps its virtual block in every phase, idle or not, so that
// block l stays layer l's throughout (a layer whose schedule has ended would otherwise shift the next layers' blocks
// onto other blocks, which nothing orders after their earlier steps).
SN_EXT_HOST_DEVICE inline int64_t phase_blocks(const FusedPlan& p, int64_t t, int64_t n, bool v_first,
                                               bool independent) {
  if (p.dense()) return t >= 0 || independent ? 1 : 0;
  if (t < 0) return 0;
  return fused_step(t, n, v_first, false).phase == FusedPhase::kSums ? p.reduce_blocks : p.blocks;
}

// ---------------------------------------------------------------------------------------------------------------
// The backward's plan: lambda = <G, W_sn> as partial sums over `blocks` pieces of the elements (kLambdaItemsPerThread
// per thread or more, at most kMaxLambdaBlocks pieces), then the correction over the same pieces, each block finding
// lambda from the partial sums itself; one piece (dense: one block, no grid-wide barrier) where the model finds that
// chain shorter: <G, W_sn> (both tensors' loads in flight), a block sum, G again.
constexpr int64_t kMaxLambdaBlocks = 4 * kThreads;
constexpr int64_t kLambdaItemsPerThread = 8;

inline double dense_backward_ns(int64_t numel, int itemsize, const Scenario& x) {
  return (stream_trips(numel, 16 / itemsize, kStreamPairPacks) + stream_trips(numel, 16 / itemsize)) * x.l2 +
         x.block_sum + x.sync;
}

inline double spread_backward_ns(int64_t numel, int itemsize, int64_t blocks, const Scenario& x) {
  const double bytes =
      2.0 * numel * itemsize;  // each phase reads two weight-sized tensors, or reads one and writes one
  const double waves = static_cast<double>(ceil_div(blocks, kNominalGrid));
  const int64_t piece = ceil_div(numel, blocks);
  const double lambda_trips = waves * stream_trips(piece, 16 / itemsize, kStreamPairPacks);
  const double trips = waves * stream_trips(piece, 16 / itemsize);
  return at_least(lambda_trips * x.dram + waves * x.block_sum, bytes, x) +
         at_least(x.l2 + x.block_sum + trips * x.l2, bytes, x) + x.grid_barrier;
}

inline int64_t lambda_blocks_for(int64_t numel, int itemsize) {
  const int64_t wanted = ceil_div(numel, int64_t(kThreads) * kLambdaItemsPerThread);
  const int64_t blocks = wanted < 1 ? 1 : wanted > kMaxLambdaBlocks ? kMaxLambdaBlocks : wanted;
  if (blocks == 1) return 1;
  const double dense = in_all_scenarios([&](const Scenario& x) { return dense_backward_ns(numel, itemsize, x); });
  const double spread =
      in_all_scenarios([&](const Scenario& x) { return spread_backward_ns(numel, itemsize, blocks, x); });
  return dense <= spread ? 1 : blocks;
}

}  // namespace block_walk
}  // namespace sn_ext
