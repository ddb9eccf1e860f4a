// token_stats on CUDA: docs/math.md §§1-3. Torch-free (CUDA runtime + the shared math header), so
// nvcc can compile-check it on a machine with no GPU and no CUDA build of torch; the torch glue
// (checks, allocation, dtype dispatch, stream) lives in token_stats.cu.
//
// ---- Algorithm -------------------------------------------------------------------------------
// Forward, two launches:
//   1. token_stats_partial_kernel: each row is cut into C chunks of at most 128 KiB
//      where C depends on V and the dtype only (never on N, never on alignment). A work item is
//      one (row, chunk); a persistent grid (SMs x resident CTAs) walks the items in a grid-stride
//      loop. Per item a CTA
//        a) walks kSteps = 4 load steps (unrolled); per step each thread loads kUnroll = 8
//           vectors of 16 bytes (8 bf16/fp16, 4 fp32, 2 fp64 logits per vector), i.e. 8
//           independent 16-byte loads in flight per thread and 32 KiB per CTA per step;
//        b) per step: the thread's running max (NaN-propagating, on packed bf16x2/f16x2 words
//           for 16-bit logits), one branchless rescale of its sums to the new reference (one
//           exp per thread per step after the first, which starts the sums at its max;
//           ThreadRun / run_step / run_rescale, host-tested), then
//           s1 = sum e, s2 = sum e^2, t = sum e d with e = exp(d), d relative to the
//           reference (fp32 / fp64: (x - x_ref) / tau; 16-bit: z log2e - ref), one exp per
//           element, in a fixed per-thread order (s1 adds each step's pairwise sum: run_add);
//           the step where the thread's scaled max last rose is kept for the argmax;
//        c) after the steps, ONE CTA max M (warp shuffles + shared memory), every thread
//           rescales its sums to the chunk's reference (one exp), and the threads whose scaled
//           max is m (fp32 / fp64: the raw max M itself; 16-bit: M / tau)
//           re-read their recorded step's vectors to find their first index of m;
//        d) reduces (s1, s2, t, first argmax) over the CTA in a fixed order (xor-butterfly in
//           each warp, lane 0's value, then the warp partials by an xor-butterfly over 8 lanes
//           of warp 0, absent warps adding 0), the top thread's s1 and s2 (the first thread
//           holding the chunk's max; fp32 / 16-bit logits) left out of those sums and summed again
//           in fp64 by its warp (top_vector_sums), and writes the chunk's partial state (m, s1,
//           s2, t, argmax; s1 and s2 in double) to a [C][N] workspace.
//   2. token_stats_finalize_kernel: one thread per row folds its C partial states left to right
//      (chunk 0, 1, ..., C-1) with the docs/math.md §1 merge, in double precision, reads the label
//      logit (16-bit logits: and the max logit, at the argmax), and writes the seven outputs
//      (finalize_token_stats of softmax_stats.h; fold_row, finalize_row_fast).
//   Every reduction order is fixed by (V, dtype): results are bitwise deterministic and do not
//   depend on N (batch invariance), on the grid size, or on which CTA ran an item. The aligned
//   (16-byte vector) and unaligned (scalar) load paths fill the same registers with the same bits
//   for the same thread, so they give bitwise the same results too. The vector kernels
//   (kAligned) run when the rows are 16-byte aligned and made of whole vectors (V % kVec == 0),
//   so they carry no partial-vector code; other rows take the element-wise kernels.
// Backward, one launch (token_stats_backward_kernel): same chunking and grid; per element
//   p = exp(d), d = (x - x_max) / tau - log s1 relative to the row max from the saved argmax and
//   max_prob (fp32 / fp64; 16-bit logits: d = z - L from the saved L, one FFMA; their label's
//   entry in double relative to the max, label_grad16), dz = p (a + b d + c p) (+ g_l at the
//   label), divided by tau
//   (folded into a, b, c), rounded once to the logits' dtype and stored as 16-byte vectors. The
//   label's entry (which adds g_l, with the accurate exp of label_grad) is computed once per item
//   by the thread that stored the label's vector, which then overwrites that one element.
//   16-bit logits, a second launch (token_stats_backward_far_kernel): rows whose saved L lies
//   beyond kFarLse (|L| ~ 1420: vocabularies masked whole, or logits far beyond a model's) are
//   written again relative to their raw max; every other row reads 3 scalars.
//
// ---- Bytes moved per row (S = sizeof(logit), A = sizeof(acc) = 4, 8 for fp64) ----------------
//   forward:  reads V*S (each logit once) + label + tau + the label logit (one 32 B sector);
//             writes C*(2A + 20) partial bytes, which finalize reads back; writes 6A + 8 outputs.
//             Qwen vocab, bf16: V*S = 303,872 B, C = 3, partials 84 B: 0.03 % overhead.
//   backward: reads V*S + 9 per-row scalars, writes V*S (the gradient), once each.
//
// ---- Launch configuration ---------------------------------------------------------------------
//   * CTA: up to 256 threads (8 warps), fewer when V is small (threads = 32 * ceil(vectors per
//     chunk / (8 * 32)), a function of V only) so that small vocabularies do not run idle warps.
//   * Chunk: at most 256 threads x 4 steps x 8 vectors x 16 B = 128 KiB; C = ceil(vectors /
//     8192), and the vectors are spread evenly over the C chunks (chunk boundaries stay
//     multiples of 16 B). Qwen bf16 (V = 151936): 18992 vectors -> C = 3 chunks of 6331 vectors
//     (224 threads, 28.3 vectors per thread).
//   * Grid: min(items, SMs x resident CTAs per SM from the occupancy calculator). At <= 80
//     registers per thread (__launch_bounds__(256, 3); fp32 (256, 2), fp64 (256, 1)) an H100
//     holds 3 CTAs = 768 threads per SM, i.e. up to 96 KiB of loads in flight per SM per step
//     while Little's law asks for roughly bandwidth/SM x latency = 22.7 B/ns x ~1 us ~= 23 KiB.
//     (Not measured on a GPU: fewer resident CTAs overlap less of the reduce phase, which now
//     comes once per 4 load steps.)
//   * Issue budget: .ci/check_cuda_budgets.py counts the SASS instructions of each hot loop (the
//     item loop, every instruction in its address range, rare branches included) per element a
//     thread handles per item (kUnroll x kVec), sm_90, against <= 10 (partial) and <= 12
//     (backward) per 16-bit element, 20 / 24 per fp32 element (the same per byte). Temperature is a
//     runtime value (inv_tau), so one kernel covers tau = 1 and tau != 1. Vector kernels
//     (kAligned), nvcc 13.0, per element (registers):
//                         first      one step   4 steps    now (4 steps, 32-bit
//                                    per item   per item   vector index, plain step 0)
//       partial  bf16     31.2 (64)  14.8 (64)  10.4 (80)  9.9 (80)    2539 per item
//       partial  fp16     31.2 (64)  14.8 (64)  10.4 (80)  9.9 (80)    2539
//       partial  fp32     47.7 (64)  27.5 (64)  19.0 (128) 18.1 (128)  relative to the raw max
//       backward bf16     58.1 (64)  15.2 (64)  12.0 (80)  11.5 (80)
//       backward fp16     58.1 (64)  15.2 (64)  12.0 (80)  11.5 (80)
//       backward fp32     64.8 (59)  27.5 (64)  21.8 (128) 21.2 (128)  relative to the row max
//                                                                      (per-item loads)
//     "first" held the partial-vector load/store code in the vector kernels, kUnroll x kVec
//     inlined copies of the label's accurate gradient (backward) and of the argmax compare
//     (forward). "4 steps" spread an item's fixed cost over 256 (fp32 128) elements per thread
//     instead of 64. "now": load_item addresses vector v of the row as x + 16 v with
//     v = vec0 + s kUnroll T + u T + tid a 32-bit index (one IMAD.WIDE.U32 per 16-byte load, the
//     chunk base folded into v) instead of a 64-bit pointer add per load (IADD3 + LEA.HI.X.SX32 +
//     LEA + LEA.HI.X and a multiply of T): 10.4 -> 9.9 (2667 -> 2547 per item); and run_step's
//     step 0 sets the state from the step's max instead of rescaling the empty run (same bits):
//     2547 -> 2539. Then the far references of ForwardTermFast::ref_of (a vocabulary masked with
//     -1e30 or finfo.min gave NaN rows; 4 instructions per reference, 5 references per item):
//     2539 -> 2558 (10.0 per element), the budget's last 19 but 2.
//     Where the 2539 instructions of a 16-bit forward item went before that (sm_90 SASS, read with
//     `check_cuda_budgets.py --dump partial BF16`): 1792 = 7 per element (unpack: bf16 LOP3 or
//     SHF, fp16 HADD2.F32; FFMA, clamp FMNMX, MUFU.EX2, FADD, 2 FFMA); 256 = 8 per 16-byte load
//     (IADD3 of the index, ISETP, IMAD.WIDE.U32, 4 moves of the -inf fill, LDG); 126 for the 4
//     steps' packed maxes (16 VHMNMX / HMNMX2 each) and the rescales of steps 1-3; 365 fixed per
//     item (cursor walk and row-scalar prefetch, the CTA max with its barrier, the final rescale,
//     the argmax loop, the warp and CTA sums, the workspace writes). The budget (2560) leaves 21.
//     Tried before: 5 steps reach 10.1; 5 steps with the tail slots loading a -inf vector from
//     device memory (address select instead of the fill moves) reach 9.9 on sm_90, but the bf16
//     vector kernel then spills on sm_80 (around the CALL of __frcp_rn's slow path in
//     load_row_scalars), at 80 and at 128 registers alike. Left for more headroom: the -inf fill
//     (0.5 per element; on sm_90 since, below) and the per-element clamp (1 per element). The
//     element-wise kernels (kAligned = false: rows not 16-byte aligned or V % kVec != 0) are
//     printed by the check, not budgeted (bf16: partial 19.0, backward 24.9). On an H200
//     (2026-12-04, bf16 16384 x 151936): forward 1.04x one read, fwd+bwd 1.22x read + copy. Then
//     the top thread's fp64 sums (top_vector_sums: its warp reads its 32 vectors again, one per
//     lane, and sums their terms in fp64; 2026-12-07): 2558 -> 2718 (10.6 per element; fp32
//     18.1 -> 19.3 of 20). ~15 of those instructions run in every warp (the top warp's ballot,
//     leaving the top thread's sums out); the rest in the top thread's warp only, once per item,
//     its load issued before the argmax search so that the two reads overlap. Then load_item's
//     slots past a chunk read a -inf vector from device memory (kNegInfVector) through an
//     address select, 2 SEL, instead of a predicated load and 4 moves of the fill: 8 -> 6 per
//     16-byte load on sm_90. Written as `c ? a : b` nvcc made it 4 moves for fp16 and fp32, so it
//     is one selp.b64 (select_address); on sm_80 the 16-bit forward then spilled 12 B at its 80
//     registers, so sm_80 keeps the fill. sm_90: partial 16-bit 2718 -> 2644 (10.3, owed in
//     check_cuda_budgets.py), fp32 19.3 -> 18.5; backward 16-bit 11.2 -> 11.0, fp32 21.1 ->
//     20.7. Not yet timed on a GPU: gpu_check's step bench times it beside the same build with
//     the epilogue off (ForwardParams::top_sums, PGK_CUDA_TOP_SUMS=0; provider top32:cuda),
//     whose uniform test costs 2 more (partial 16-bit 2646).
//   * Shared memory: 8 warps x 5 scalars per reduction stage; one word per warp, written by lane
//     0 and read as broadcasts, so there are no bank conflicts. Two barriers per item (4 steps).
//   * Row scalars (label, tau; in backward also L, H, C and the four upstream grads) of the next
//     item are loaded one iteration ahead, so their latency hides behind the current item.
//
// ---- Accuracy ---------------------------------------------------------------------------------
//   * 16-bit logits: e = 2^(x c - ref) with one FFMA and ex2.approx (2 ulp), c = fl(log2e / tau),
//     ref = fl(m log2e). The exponent's offset from (z - m) log2e, the rounding of ref (up to
//     2^-24 |z| log2e: 3e-5 at |z| ~ 1000), is common to a chunk's terms: finalize merges the
//     chunks relative to their refs and finishes relative to the max's own term e_m = ex2(eps)
//     (fold_row, finalize_row_fast), so it cancels; what stays is the exponent's rounding
//     relative to |d| and the fp32 sums (host_test's 16-bit rows: lse, log p, entropy and lgp
//     within 7.2e-7 beyond their fp32 rounding, against 5e-5 when finished in z units; s1 adds
//     pairwise sums of 16 values, run_add). The thread holding the chunk's max is summed again
//     in fp64 (top_vector_sums): its fp32 sums rounded every term beside the max's ~1 at
//     ulp(1) / 2, which is all a peaked row's lgp, entropy and log p are made of (host_test's
//     peaked and confident rows).
//   * fp32 logits: relative to the raw max, as the CPU rows: d = (x - x_ref) / tau as the
//     difference rounded once times 1 / tau, an error relative to |d| (z = x / tau rounded, then
//     z - m, carried ulp(z) / 2 of each: plain PyTorch's error, host_test's fp32 rows up to 3.9e-5
//     in log p at |z| ~ 800, against 4.8e-7 now), the max's own term exactly 1, and the label's d
//     in double from the raw logits in finalize_row; exp(d) is ex2.approx of a two-part d log2e
//     (~2-3 ulp), since fp32 gradients keep fp32 precision. Compiler flags (--use_fast_math) do
//     not change either path: both use explicit PTX / intrinsics.
//   * fp64 logits: plain double arithmetic.
//   * Partial states are merged and finalized in double (also for fp32 accumulation), so the
//     approximate single-precision log/exp/division of --use_fast_math never reach an output.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "pg_kernels/softmax_stats.h"

namespace pg_kernels {
namespace gpu {

// ---------------------------------------------------------------------------------------------
// Tuning constants (see "Launch configuration" above).
constexpr int kMaxThreads = 256;              // threads per CTA at most (8 warps)
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kUnroll = 8;                    // 16-byte vectors per thread per load step
constexpr int kSteps = 4;                     // load steps per item (unrolled)
// Register cap: 65536 / (3 * 256) = 80 per thread (kSteps load steps per item spill at 64: the
// compiler issues the next step's loads while the current step computes). fp32: 2 CTAs (128
// registers; it spills at 80). Either way >= 512 threads x 128 B = 64 KiB of loads in flight
// per SM, well above the ~23 KiB Little's law asks for.
constexpr int kMinBlocksPerSM = 3;
// 256 threads x 8 vectors x 4 steps = 8192 x 16 B = 128 KiB per chunk.
constexpr int64_t kVectorsPerChunk = int64_t(kMaxThreads) * kUnroll * kSteps;
constexpr int kFinalizeThreads = 128;

// ---------------------------------------------------------------------------------------------
// Logit dtypes. The kernels see logits as raw bits; each dtype says how to turn bits into the
// accumulation type and back. kVec elements fill one 16-byte vector (a uint4).
struct BF16 {};
struct F16 {};
struct F32 {};
struct F64 {};

template <typename Tag>
struct DTypeTraits;

template <>
struct DTypeTraits<BF16> {
  using acc_t = float;
  using bits_t = uint16_t;
  static constexpr int kVec = 8;
  static constexpr bool kPacked16 = true;
  static constexpr uint16_t kNegInfBits = 0xFF80;
  static constexpr uint16_t kNaNBits = 0x7FC0;
  static constexpr int kMinBlocks = kMinBlocksPerSM;
  static constexpr int kMinBlocksFwd = kMinBlocksPerSM;
};
template <>
struct DTypeTraits<F16> {
  using acc_t = float;
  using bits_t = uint16_t;
  static constexpr int kVec = 8;
  static constexpr bool kPacked16 = true;
  static constexpr uint16_t kNegInfBits = 0xFC00;
  static constexpr uint16_t kNaNBits = 0x7E00;
  static constexpr int kMinBlocks = kMinBlocksPerSM;
  static constexpr int kMinBlocksFwd = kMinBlocksPerSM;
};
template <>
struct DTypeTraits<F32> {
  using acc_t = float;
  using bits_t = uint32_t;
  static constexpr int kVec = 4;
  static constexpr bool kPacked16 = false;
  static constexpr uint32_t kNegInfBits = 0xFF800000u;
  static constexpr uint32_t kNaNBits = 0x7FC00000u;
  static constexpr int kMinBlocks = 2;
  static constexpr int kMinBlocksFwd = 2;
};
template <>
struct DTypeTraits<F64> {
  using acc_t = double;
  using bits_t = unsigned long long;
  static constexpr int kVec = 2;
  static constexpr bool kPacked16 = false;
  static constexpr unsigned long long kNegInfBits = 0xFFF0000000000000ull;
  static constexpr unsigned long long kNaNBits = 0x7FF8000000000000ull;
  // fp64 is not a performance target and double exp needs many registers: 1 CTA per SM (up to
  // 255 registers; kSteps steps spill at 128) instead of spilling.
  static constexpr int kMinBlocks = 1;
  static constexpr int kMinBlocksFwd = 1;
};

// ---------------------------------------------------------------------------------------------
// Chunking: a function of (V, dtype) only, shared by forward and backward and by the host.
// In-row indices are 32-bit in the kernels (fewer registers and instructions): the glue checks
// V <= kMaxVocab.
constexpr int64_t kMaxVocab = (int64_t(1) << 31) - 64;

struct ChunkPlan {
  int n_vecs;           // 16-byte vectors per row, ceil(V / kVec) (the last may be partial)
  int n_chunks;         // C >= 1
  int vecs_per_chunk;   // chunk k covers vectors [k * vecs_per_chunk, (k + 1) * vecs_per_chunk)
  int threads;          // CTA size: multiple of 32, <= kMaxThreads,
                        // threads * kUnroll * kSteps >= vecs_per_chunk
};

PGK_HD ChunkPlan plan_chunks(int64_t V, int vec) {
  ChunkPlan p;
  const int64_t n_vecs = V > 0 ? (V + vec - 1) / vec : 0;
  const int64_t n_chunks = n_vecs > 0 ? (n_vecs + kVectorsPerChunk - 1) / kVectorsPerChunk : 1;
  const int64_t per_chunk = n_vecs > 0 ? (n_vecs + n_chunks - 1) / n_chunks : 1;
  const int64_t per_thread_rows = (per_chunk + kUnroll * kSteps - 1) / (kUnroll * kSteps);
  const int64_t warps = (per_thread_rows + 31) / 32;
  p.n_vecs = static_cast<int>(n_vecs);
  p.n_chunks = static_cast<int>(n_chunks);
  p.vecs_per_chunk = static_cast<int>(per_chunk);
  p.threads = static_cast<int>(warps < 1 ? 32 : (warps > kMaxWarps ? kMaxThreads : warps * 32));
  return p;
}

// Row r of a [..., V] tensor starts at this element offset (int64: N * V exceeds 2^31).
struct RowLayout {
  int64_t n_inner;       // rows per outer step (>= 1)
  int64_t stride_outer;  // elements between outer steps
  int64_t stride_inner;  // elements between consecutive rows inside an outer step
  PGK_HD int64_t offset(int64_t r) const {
    return (r / n_inner) * stride_outer + (r % n_inner) * stride_inner;
  }
};

// Can every row of `ptr` (rows given by layout, N rows) be read with 16-byte vector loads?
// The base pointer and every stride that is actually used must be multiples of 16 bytes.
inline bool rows_are_16b_aligned(const void* ptr, int64_t elem_size, int64_t N,
                                 const RowLayout& layout) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  const bool inner_used = N > 1 && layout.n_inner > 1;
  const bool outer_used = N > layout.n_inner;
  if (inner_used && (layout.stride_inner * elem_size) % 16 != 0) return false;
  if (outer_used && (layout.stride_outer * elem_size) % 16 != 0) return false;
  return true;
}

// A CTA walks the items blockIdx.x, blockIdx.x + gridDim.x, ...; item = row * C + chunk. These
// steps (computed on the host from the grid size) advance (row, chunk) and the row's
// (outer, inner) layout coordinates without a 64-bit division per item, which would cost ~15 %
// of an item's instructions.
struct GridWalk {
  int64_t step_row;    // gridDim.x / C
  int step_chunk;      // gridDim.x % C
  int64_t step_outer;  // step_row / n_inner
  int64_t step_inner;  // step_row % n_inner
};

inline GridWalk make_grid_walk(int64_t grid, int n_chunks, int64_t n_inner) {
  GridWalk w;
  w.step_row = grid / n_chunks;
  w.step_chunk = static_cast<int>(grid % n_chunks);
  w.step_outer = w.step_row / n_inner;
  w.step_inner = w.step_row % n_inner;
  return w;
}

struct ItemCursor {
  int64_t row;
  int chunk;
  int64_t outer, inner;  // row = outer * n_inner + inner
  PGK_HD void init(int64_t item, int C, int64_t n_inner) {
    row = item / C;
    chunk = static_cast<int>(item - row * C);
    outer = row / n_inner;
    inner = row - outer * n_inner;
  }
  PGK_HD void advance(const GridWalk& w, int C, int64_t n_inner) {
    row += w.step_row;
    chunk += w.step_chunk;
    outer += w.step_outer;
    inner += w.step_inner;
    if (chunk >= C) {  // carry: one row further
      chunk -= C;
      ++row;
      ++inner;
    }
    if (inner >= n_inner) {  // inner < 2 n_inner here, so one carry is enough
      inner -= n_inner;
      ++outer;
    }
  }
  PGK_HD int64_t offset(const RowLayout& l) const {
    return outer * l.stride_outer + inner * l.stride_inner;
  }
};

// ---------------------------------------------------------------------------------------------
// Kernel parameters (plain structs passed by value).
template <typename acc_t>
struct RowInputs {
  const void* logits;          // bits of the logits' dtype
  const void* labels;          // int64 or int32, [N]
  bool labels_int32;
  const acc_t* temperature;    // per-row [N], or nullptr for the scalar below
  acc_t inv_tau_scalar;        // 1 / temperature_scalar, rounded as on the CPU
  int64_t ignore_index;
  int64_t N;
  int64_t V;
  RowLayout layout;
  ChunkPlan plan;
  GridWalk walk;               // set by the launcher from its grid size
};

template <typename acc_t>
struct ForwardParams {
  RowInputs<acc_t> in;
  // Workspace, [C][N] each (chunk-major: finalize reads it coalesced).
  acc_t* ws_m;
  double* ws_s1;  // double: the top thread's sums join the chunk's in fp64 (top_vector_sums)
  double* ws_s2;
  acc_t* ws_t;
  int32_t* ws_idx;  // first argmax of the chunk, as an index into the row
  // false: each chunk's top thread summed in fp32 like the others (no top_vector_sums), the
  // kernel's earlier arithmetic, for timing the two in one build (PGK_CUDA_TOP_SUMS=0).
  bool top_sums = true;
  // Outputs, [N] each.
  acc_t* logprob;
  acc_t* entropy;
  acc_t* collision;
  acc_t* lgp;
  acc_t* lse;
  acc_t* max_prob;
  int64_t* argmax;
};

template <typename acc_t>
struct BackwardParams {
  RowInputs<acc_t> in;
  const acc_t* g_logprob;  // [N] each, contiguous
  const acc_t* g_entropy;
  const acc_t* g_collision;
  const acc_t* g_lse;
  const acc_t* lse;        // saved by forward
  const acc_t* entropy;
  const acc_t* collision;
  const acc_t* max_prob;   // saved by forward: 1 / s1 = p at the argmax
  const int64_t* argmax;   // saved by forward: the row max m is z there
  void* grad;              // [N, V] contiguous, logits' dtype
};

// ---------------------------------------------------------------------------------------------
// Scalar helpers (device).

// NaN-propagating max (docs/math.md: a NaN row must stay NaN; fmaxf would drop it). max.NaN is sm_80+.
__device__ __forceinline__ float max_nan_f32(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return max_nan(a, b);
#endif
}
__device__ __forceinline__ double max_nan_acc(double a, double b) { return max_nan(a, b); }
__device__ __forceinline__ float max_nan_acc(float a, float b) { return max_nan_f32(a, b); }

// Max of two packed 16-bit pairs, NaN-propagating, one instruction for two logits.
template <typename Tag>
__device__ __forceinline__ uint32_t max_nan_x2(uint32_t a, uint32_t b);
// Before sm_80 there is no packed max.NaN: callers convert and use max_nan_f32 instead.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define PGK_PACKED_MAX 1
#else
#define PGK_PACKED_MAX 0
#endif
template <>
__device__ __forceinline__ uint32_t max_nan_x2<BF16>(uint32_t a, uint32_t b) {
  uint32_t r;
#if PGK_PACKED_MAX
  asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
#else
  r = 0;  // unused: thread_max does not call it
#endif
  return r;
}
template <>
__device__ __forceinline__ uint32_t max_nan_x2<F16>(uint32_t a, uint32_t b) {
  uint32_t r;
#if PGK_PACKED_MAX
  asm("max.NaN.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
#else
  r = 0;  // unused: thread_max does not call it
#endif
  return r;
}

// 2^x, ex2.approx with denormal results flushed to 0 (2 ulp; x <= -126 gives 0).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

constexpr float kLog2e = 1.44269502162933349609375f;     // float(log2 e)
constexpr float kLog2eLo = 1.925963033500011079e-8f;     // log2 e - kLog2e
constexpr float kLn2 = 0.693147182464599609375f;         // float(ln 2)
constexpr double kLn2Double = 0.69314718055994530942;

// Finite clamps for d = z - m (or z - L) so that -inf logits give e = 0 and e * d = 0, never
// 0 * -inf: softmax_stats.h's exp_zero_below (exp underflows to exactly 0 below it, and b * d
// cannot overflow), as the CPU kernel, and the same bound in base-2 units for the 16-bit path.
// (Constants after inlining: fp32 -128, fp64 -1024.)
PGK_HD float min_d32() { return exp_zero_below<float>(); }
PGK_HD double min_d64() { return exp_zero_below<double>(); }
PGK_HD float min_d2_fast() { return exp_zero_below<float>() * kLog2e; }

__device__ __forceinline__ float reciprocal(float t) { return __frcp_rn(t); }  // == 1.0f / t
__device__ __forceinline__ double reciprocal(double t) { return 1.0 / t; }

template <typename acc_t>
__device__ __forceinline__ bool is_finite_positive(acc_t t) {
  return t > acc_t(0) && t < -neg_inf<acc_t>();
}

__device__ __forceinline__ int64_t load_label(const void* labels, bool is_int32, int64_t r) {
  return is_int32 ? static_cast<int64_t>(__ldg(static_cast<const int32_t*>(labels) + r))
                  : static_cast<int64_t>(__ldg(static_cast<const long long*>(labels) + r));
}

// ---------------------------------------------------------------------------------------------
// Bits <-> accumulation type.

template <typename Tag>
__device__ __forceinline__ typename DTypeTraits<Tag>::acc_t bits_to_acc(
    typename DTypeTraits<Tag>::bits_t b);
template <>
__device__ __forceinline__ float bits_to_acc<BF16>(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}
template <>
__device__ __forceinline__ float bits_to_acc<F16>(uint16_t b) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
  return f;
}
template <>
__device__ __forceinline__ float bits_to_acc<F32>(uint32_t b) {
  return __uint_as_float(b);
}
template <>
__device__ __forceinline__ double bits_to_acc<F64>(unsigned long long b) {
  return __longlong_as_double(static_cast<long long>(b));
}

// Element j of a 16-byte vector, as acc_t. j is a compile-time constant after unrolling.
template <typename Tag>
__device__ __forceinline__ typename DTypeTraits<Tag>::acc_t element(const uint4& v, int j) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (std::is_same_v<Tag, BF16>) {
    const uint32_t word = w[j >> 1];
    // Low half: shift up; high half: mask. One integer op per logit.
    return __uint_as_float((j & 1) ? (word & 0xFFFF0000u) : (word << 16));
  } else if constexpr (std::is_same_v<Tag, F16>) {
    const uint32_t word = w[j >> 1];
    return bits_to_acc<F16>(static_cast<uint16_t>((j & 1) ? (word >> 16) : (word & 0xFFFFu)));
  } else if constexpr (std::is_same_v<Tag, F32>) {
    return __uint_as_float(w[j]);
  } else {
    return __hiloint2double(static_cast<int>(w[2 * j + 1]), static_cast<int>(w[2 * j]));
  }
}

// fp32 -> bf16 bits, round to nearest even (pre-sm_80 fallback of cvt.rn.bf16x2.f32).
__device__ __forceinline__ uint32_t f32_to_bf16_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

// Pack kVec acc_t values (rounded to nearest even, once) into a 16-byte vector.
template <typename Tag>
__device__ __forceinline__ uint4 pack_vector(const typename DTypeTraits<Tag>::acc_t* g) {
  uint32_t w[4];
  if constexpr (std::is_same_v<Tag, BF16>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
      // d = {hi: g[2i+1], lo: g[2i]}, round to nearest even, NaN stays NaN.
      asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w[i]) : "f"(g[2 * i + 1]), "f"(g[2 * i]));
#else
      w[i] = f32_to_bf16_bits(g[2 * i]) | (f32_to_bf16_bits(g[2 * i + 1]) << 16);
#endif
    }
  } else if constexpr (std::is_same_v<Tag, F16>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint16_t lo, hi;
      asm("cvt.rn.f16.f32 %0, %1;" : "=h"(lo) : "f"(g[2 * i]));
      asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hi) : "f"(g[2 * i + 1]));
      w[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  } else if constexpr (std::is_same_v<Tag, F32>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(g[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const long long b = __double_as_longlong(g[i]);
      w[2 * i] = static_cast<uint32_t>(b);
      w[2 * i + 1] = static_cast<uint32_t>(static_cast<unsigned long long>(b) >> 32);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// One acc_t value rounded (to nearest even, once) to the logits' dtype: the element pack_vector
// would produce.
template <typename Tag>
__device__ __forceinline__ typename DTypeTraits<Tag>::bits_t acc_to_bits(
    typename DTypeTraits<Tag>::acc_t g) {
  if constexpr (std::is_same_v<Tag, BF16>) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    uint16_t b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(g));
    return b;
#else
    return static_cast<uint16_t>(f32_to_bf16_bits(g));
#endif
  } else if constexpr (std::is_same_v<Tag, F16>) {
    uint16_t b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(g));
    return b;
  } else if constexpr (std::is_same_v<Tag, F32>) {
    return __float_as_uint(g);
  } else {
    return static_cast<unsigned long long>(__double_as_longlong(g));
  }
}

// A vector whose every element has the given bits (constexpr: kNegInfVector's initializer).
template <typename Tag>
__host__ __device__ constexpr uint4 splat_bits(typename DTypeTraits<Tag>::bits_t b) {
  using Tr = DTypeTraits<Tag>;
  if constexpr (sizeof(typename Tr::bits_t) == 2) {
    const uint32_t w = static_cast<uint32_t>(b) | (static_cast<uint32_t>(b) << 16);
    return uint4{w, w, w, w};
  } else if constexpr (sizeof(typename Tr::bits_t) == 4) {
    return uint4{b, b, b, b};
  } else {
    const uint32_t lo = static_cast<uint32_t>(b), hi = static_cast<uint32_t>(b >> 32);
    return uint4{lo, hi, lo, hi};
  }
}

// Vector g of a row (elements [g * kVec, g * kVec + kVec)), elements at or past V read as -inf,
// by element-wise loads (rows that are not 16-byte aligned or not whole vectors): the same bits in
// the same registers as one 16-byte load of an aligned row.
template <typename Tag>
__device__ __forceinline__ uint4 load_vector(const typename DTypeTraits<Tag>::bits_t* row,
                                             int g, int V) {
  using Tr = DTypeTraits<Tag>;
  using bits_t = typename Tr::bits_t;
  const int e0 = g * Tr::kVec;
  bits_t b[Tr::kVec];
#pragma unroll
  for (int j = 0; j < Tr::kVec; ++j) b[j] = e0 + j < V ? __ldg(row + e0 + j) : Tr::kNegInfBits;
  if constexpr (sizeof(bits_t) == 2) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = static_cast<uint32_t>(b[2 * i]) | (static_cast<uint32_t>(b[2 * i + 1]) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
  } else if constexpr (sizeof(bits_t) == 4) {
    return make_uint4(b[0], b[1], b[2], b[3]);
  } else {
    return make_uint4(static_cast<uint32_t>(b[0]), static_cast<uint32_t>(b[0] >> 32),
                      static_cast<uint32_t>(b[1]), static_cast<uint32_t>(b[1] >> 32));
  }
}

// Store vector g of a gradient row element-wise (the counterpart of load_vector); only elements
// < V are written.
template <typename Tag>
__device__ __forceinline__ void store_vector(typename DTypeTraits<Tag>::bits_t* row, int g, int V,
                                             const uint4& v) {
  using Tr = DTypeTraits<Tag>;
  using bits_t = typename Tr::bits_t;
  const int e0 = g * Tr::kVec;
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < Tr::kVec; ++j) {
    if (e0 + j >= V) break;
    bits_t b;
    if constexpr (sizeof(bits_t) == 2) {
      b = static_cast<bits_t>((j & 1) ? (w[j >> 1] >> 16) : (w[j >> 1] & 0xFFFFu));
    } else if constexpr (sizeof(bits_t) == 4) {
      b = w[j];
    } else {
      b = static_cast<bits_t>(w[2 * j]) | (static_cast<bits_t>(w[2 * j + 1]) << 32);
    }
    row[e0 + j] = b;
  }
}

// Vector g of a row: one 16-byte load (kAligned rows) or element-wise (load_vector).
template <typename Tag, bool kAligned>
__device__ __forceinline__ uint4 row_vector(const typename DTypeTraits<Tag>::bits_t* x, int g,
                                            int V) {
  if constexpr (kAligned) {
    return __ldg(reinterpret_cast<const uint4*>(x) + static_cast<uint32_t>(g));
  } else {
    return load_vector<Tag>(x, g, V);
  }
}

// A 16-byte vector of -inf in device memory, per dtype: on sm_90 load_item's slots past a
// chunk read it (an address select, 2 instructions) instead of filling 4 registers beside a
// predicated load.
template <typename Tag>
static __device__ const uint4 kNegInfVector = splat_bits<Tag>(DTypeTraits<Tag>::kNegInfBits);
// c ? a : b as one selp.b64 (2 SEL): written as C++, nvcc turned it into 2 MOVs of b and 2
// predicated MOVs of a for some dtypes.
__device__ __forceinline__ const uint4* select_address(bool c, const uint4* a, const uint4* b) {
  const uint4* r;
  asm("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %3, 0;\n\tselp.b64 %0, %1, %2, p;\n\t}"
      : "=l"(r)
      : "l"(a), "l"(b), "r"(int(c)));
  return r;
}

// The kUnroll vectors of a thread for one load step of an item: vector v = first + u * T + tid
// of the chunk (first = step * kUnroll * T), i.e. the warp's 32 lanes read 512 contiguous bytes
// per u. Slots past the chunk read as -inf.
// kAligned: 16-byte aligned rows made of whole vectors (the launchers choose this kernel only
// when V % kVec == 0), so every vector of the chunk is one 16-byte load from the row's base
// pointer, addressed by the vector's 32-bit index in the row (one IMAD.WIDE.U32 per load; a
// 64-bit pointer add per load costs 4 more instructions: see "Issue budget").
// Otherwise element-wise loads (load_vector) that build the same bits in the same registers.
template <typename Tag, bool kAligned>
__device__ __forceinline__ void load_item(uint4 (&raw)[kUnroll],
                                          const typename DTypeTraits<Tag>::bits_t* x, int vec0,
                                          int first, int n_here, int V, int T, int tid) {
  using Tr = DTypeTraits<Tag>;
  const uint4 fill = splat_bits<Tag>(Tr::kNegInfBits);
  if constexpr (kAligned) {
    const uint4* src = reinterpret_cast<const uint4*>(x);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // sm_90 and later (checked on sm_90)
    const uint4* neg_inf = &kNegInfVector<Tag>;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = vec0 + first + u * T + tid;
      raw[u] = __ldg(select_address(v < vec0 + n_here, src + static_cast<uint32_t>(v), neg_inf));
    }
#else  // sm_80: the 16-bit forward spilled 12 B at its 80 registers with the address select
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = vec0 + first + u * T + tid;
      raw[u] = v < vec0 + n_here ? __ldg(src + static_cast<uint32_t>(v)) : fill;
    }
#endif
  } else {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = first + u * T + tid;
      raw[u] = v < n_here ? load_vector<Tag>(x, vec0 + v, V) : fill;
    }
  }
}

// Max over every element of a thread's vectors, NaN-propagating.
template <typename Tag>
__device__ __forceinline__ typename DTypeTraits<Tag>::acc_t thread_max(const uint4 (&raw)[kUnroll]) {
  using Tr = DTypeTraits<Tag>;
  if constexpr (Tr::kPacked16 && PGK_PACKED_MAX) {
    // Exact in the 16-bit type; half the instructions of converting first.
    uint32_t m = raw[0].x;
    m = max_nan_x2<Tag>(m, raw[0].y);
    m = max_nan_x2<Tag>(m, raw[0].z);
    m = max_nan_x2<Tag>(m, raw[0].w);
#pragma unroll
    for (int u = 1; u < kUnroll; ++u) {
      m = max_nan_x2<Tag>(m, raw[u].x);
      m = max_nan_x2<Tag>(m, raw[u].y);
      m = max_nan_x2<Tag>(m, raw[u].z);
      m = max_nan_x2<Tag>(m, raw[u].w);
    }
    return max_nan_f32(bits_to_acc<Tag>(static_cast<uint16_t>(m & 0xFFFFu)),
                       bits_to_acc<Tag>(static_cast<uint16_t>(m >> 16)));
  } else {
    auto m = element<Tag>(raw[0], 0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < Tr::kVec; ++j) m = max_nan_acc(m, element<Tag>(raw[u], j));
    return m;
  }
}

// ---------------------------------------------------------------------------------------------
// Host/device scalar primitives of the forward's per-thread state and of the backward's
// per-element gradient, so that the host test (check/host_test.cu) runs the very arithmetic the
// kernels run. On the host, ex2.approx is std::exp2
// with subnormal results flushed to 0 (the device's approximation error, <= 2 ulp, is not
// emulated) and the rounded products are plain products (no FMA contraction on the host build).
PGK_HD float hd_ex2(float x) {
#if defined(__CUDA_ARCH__)
  return ex2_approx(x);
#else
  const float y = std::exp2(x);
  return y < std::numeric_limits<float>::min() ? 0.0f : y;
#endif
}
// float -> double, exact. The device's cvt without .ftz: --use_fast_math flushes a subnormal
// operand of cvt.f64.f32 with an FMUL by 1 first, and the callers' operands (ex2.approx.ftz
// results, fp32 sums) are never subnormal.
PGK_HD double hd_widen(float x) {
#if defined(__CUDA_ARCH__)
  double d;
  asm("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(x));
  return d;
#else
  return double(x);
#endif
}
PGK_HD double hd_widen(double x) { return x; }
PGK_HD float hd_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PGK_HD double hd_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
PGK_HD float hd_max_nan(float a, float b) {
#if defined(__CUDA_ARCH__)
  return max_nan_f32(a, b);
#else
  return max_nan(a, b);
#endif
}
PGK_HD double hd_max_nan(double a, double b) { return max_nan(a, b); }
PGK_HD float hd_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
PGK_HD double hd_sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
// exp(d) for fp32 to ~2-3 ulp: 2^(d log2e) with d log2e split into h + l, h = fl(d kLog2e) and
// l = the product's exact rounding error (FMA) + d (log2e - kLog2e); then 2^l ~= 1 + l ln2
// (|l| < 2^-16). Without the split, fl(d log2e) alone costs |d| 2^-24 relative. Emulated on the
// host over d in [-88, 0] with a correctly rounded 2^h: split <= 1.0 ulp (mean 0.32), unsplit up
// to 64 ulp (mean 7.5); ex2.approx adds its own <= 2 ulp.
// d must be >= min_d32() = -128 (callers clamp): then h > -185, so no overflow in the error terms.
PGK_HD float hd_exp_accurate(float d) {
  const float h = hd_mul(d, kLog2e);
  float l = fmaf(d, kLog2e, -h);
  l = fmaf(d, kLog2eLo, l);
  const float e = hd_ex2(h);
  return fmaf(e, hd_mul(l, kLn2), e);
}

PGK_HD double hd_exp_accurate(double d) { return ::exp(d); }
PGK_HD float hd_fmax(float a, float b) { return fmaxf(a, b); }
PGK_HD double hd_fmax(double a, double b) { return fmax(a, b); }

PGK_HD float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
PGK_HD double fma_acc(double a, double b, double c) { return fma(a, b, c); }

// ---------------------------------------------------------------------------------------------
// Forward: per-thread running state over the load steps of an item.
//   mx:   the thread's running max of the raw logits x (NaN-propagating)
//   mz:   term.scale(mx), monotone in x: the raw max itself (fp32 / fp64), or z = fl(x / tau)
//         (16-bit logits)
//   ref:  the reference the sums are relative to: term.ref_of(mz) (the raw max, or z log2e)
//   s1, s2, t: sum e, sum e^2, sum e d with d = term's exponent relative to ref ((x - ref) / tau,
//         or z log2e - ref) and e = exp(d) (exp2 for 16-bit logits)
//   step: the last step at which mz rose strictly, i.e. the first step that holds an element
//         whose scaled value equals the thread's final mz (the argmax is searched there only).
// Each step: mx takes the step's max (one packed max per 16-bit pair), then the sums are
// rescaled to the new ref branchlessly (one exp per thread per step; a zero factor when the
// thread had no finite entry yet: the difference is clamped, never -inf - -inf = NaN; step 0
// only sets the reference), then each element adds its terms. After the loop every thread rescales to the chunk's ref and the CTA
// adds the sums in a fixed order.
template <typename acc_t>
struct ThreadRun {
  acc_t mx, mz, ref, s1, s2, t;
  int step;
};

template <typename acc_t>
PGK_HD ThreadRun<acc_t> empty_run() {
  return {neg_inf<acc_t>(), neg_inf<acc_t>(), neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0), 0};
}

// Rescale the sums to a new (not smaller) reference:
//   s1 <- a s1,  s2 <- a^2 s2,  t <- a (t + delta s1),  a = exp(delta), delta = ref - ref_new
// delta is clamped to the exp-underflow bound: a = 0 exactly when the old reference is -inf (the
// sums are then 0 and stay 0) or far below, and NaN never arises from -inf - -inf.
template <typename Term, typename acc_t>
PGK_HD void run_rescale(ThreadRun<acc_t>& r, acc_t ref_new, const Term& term) {
  const acc_t delta = term.clamp(term.delta(r.ref, ref_new));
  const acc_t a = term.exp(delta);
  r.t = a * fma_acc(delta, r.s1, r.t);
  r.s1 = a * r.s1;
  r.s2 = (a * a) * r.s2;
  r.ref = ref_new;
}

// One load step's max joins the running state (s: the step's index; step 0 on empty_run()).
// Step 0 sets the state from the step's max alone: from empty_run() the general update gives the
// same bits (max_nan(-inf, x) = x, step 0, and a rescale factor exp(clamp) = 0 that maps the zero
// sums to +0), which the compiler cannot fold (0 * x is not 0 for every float x).
template <typename Term, typename acc_t>
PGK_HD void run_step(ThreadRun<acc_t>& r, acc_t step_max, int s, const Term& term) {
  if (s == 0) {
    r.mx = step_max;
    r.mz = term.scale(step_max);
    r.ref = term.ref_of(r.mz);
    return;
  }
  const acc_t mx = hd_max_nan(r.mx, step_max);
  const acc_t mz = term.scale(mx);
  r.step = mz > r.mz ? s : r.step;
  r.mx = mx;
  r.mz = mz;
  run_rescale(r, term.ref_of(mz), term);
}

// Values per pairwise sum of run_add, in the kernel's (vector, element) order: two vectors for
// 16-bit logits; one value for fp32 and fp64 (s1 += e; their max's term is exactly 1). Larger
// groups spilled: a whole 16-bit step (64) the element-wise kernels on sm_90, 32 them too, and
// one fp32 vector the fp32 vector kernel on sm_80 (128 registers).
template <typename Tag>
constexpr int sum_group() {
  return DTypeTraits<Tag>::kPacked16 ? 2 * DTypeTraits<Tag>::kVec : 1;
}

// Values x[0, kN) (sum_group) into the thread's sums, relative to r.ref: s2 and t element by
// element (Term::add, which returns e), s1 as the group's own pairwise sum first and then one
// add. The thread holding the row max carries its e ~ 1 in s1, and each add to it rounds at
// ulp(1) / 2: element by element that was 256 such roundings per bf16 chunk, now 16
// (host_test's 16-bit rows, max over them beyond the outputs' rounding: log p 7.5e-7 -> 3.4e-7,
// entropy 1.2e-6 -> 7.2e-7, lse 4.8e-7 -> 1.3e-7). The same adds (9.9 instructions per bf16
// element on sm_90, .ci/check_cuda_budgets.py).
template <typename Term, typename acc_t, int kN>
PGK_HD void run_add(const Term& term, const acc_t (&x)[kN], ThreadRun<acc_t>& r) {
  // Constant trip counts: nvcc unrolls these (a rolled loop would put e in local memory, which
  // .ci/check_cuda.sh fails); host code has no #pragma unroll.
  acc_t e[kN];
  for (int j = 0; j < kN; ++j) e[j] = term.add(x[j], r);
  for (int w = 1; w < kN; w *= 2)
    for (int j = 0; j + w < kN; j += 2 * w) e[j] = e[j] + e[j + w];
  r.s1 = r.s1 + e[0];
}

// The top thread: the first thread of a chunk (lowest tid) whose max is the chunk's. Its sums
// carry the max's term e_m ~ 1, and each add beside it in fp32 rounds at ulp(1) / 2: in its
// per-thread chains (s2 element by element, s1 per pairwise group) and in the CTA's butterflies.
// A peaked row's lgp (s2 - e_c^2), entropy and log p (s1 - e_m) are those rests: host emulation of
// bf16 / fp16 rows with runner-ups (lgp 1e-10 .. 2e-2) put the lgp at 1.0-2.4x plain fp32
// PyTorch's mean error, its worst up to 3.4x plain's worst. So that thread's sums leave the CTA's
// fp32 sums, and its warp sums its kSteps x kUnroll vectors again in fp64 (lane l: step
// l / kUnroll, slot l % kUnroll, read from L1 / L2), each term formed as the thread's loop forms it
// relative to the chunk's reference (Term::add), so the max's own term is bitwise the one
// finalize_row_fast takes away; the workspace holds the chunk's s1, s2 in double. The other
// threads' sums round relative to their own rests. A thread tied at the max keeps its e_m in fp32:
// such a chunk's rest is at least e_m, so those roundings are relative to it.
// top_vector_sums: one lane's vector, its kN values in order, into (f1, f2) in double.
template <typename Term, typename acc_t, int kN>
PGK_HD void top_vector_sums(const Term& term, ThreadRun<acc_t> r, const acc_t (&x)[kN],
                            double& f1, double& f2) {
  for (int j = 0; j < kN; ++j) {
    const double e = hd_widen(term.add(x[j], r));  // r: a copy, whose s2 and t are dropped
    f1 = j == 0 ? e : f1 + e;
    f2 = j == 0 ? e * e : fma_acc(e, e, f2);
  }
}

// Per-element terms: s2 += e^2, t += e d relative to r.ref; each add returns e (run_add sums s1).
template <typename Tag>
struct ForwardTerm;

// 16-bit logits: base-2 units (ref = z log2e), exponent from one FFMA; t is kept in base-2 units
// (times ln 2 at the end).
struct ForwardTermFast {
  float inv_tau;
  float c;  // log2e / tau
  PGK_HD explicit ForwardTermFast(float inv_tau_) {
    inv_tau = inv_tau_;
    c = hd_mul(inv_tau_, kLog2e);
  }
  PGK_HD float scale(float x) const { return hd_mul(x, inv_tau); }
  // The base-2 reference of a thread's or chunk's max mz, r = fl(mz log2e): the max's own
  // exponent is the residual eps = x_max c - r of three roundings (c, mz, r), up to ~1.5 ulp(r):
  // 2^48 at |r| = 2^28, an overflowing 2^(2^77) at a vocabulary masked with -1e30, and r is
  // -inf once mz overflows (finfo.min at tau < 1). From 2^28 on (kFarRef) r is held inside the
  // float range and moved 2^-19 of itself up, so that every exponent of that thread or chunk is
  // <= -2^8 and its sums are exactly 0 (before, inf sums met a rescale factor of 0: NaN rows).
  // Such a thread or chunk has no mass next to a max below 2^27 (they lie 2^27 apart); a row
  // whose max lies that far out (masked whole) has no term left (README, Testing).
  // A NaN mz (a NaN logit) keeps a NaN reference: the row's NaN travels in the chunks' states
  // (the NaN entry's own term is clamped to 0). A chunk of -inf logits gets a finite reference
  // (no term of it is kept either way), but its state stays empty in the fold (chunk_ref).
  PGK_HD float ref_of(float mz) const {
    const float r = hd_mul(mz, kLog2e);
    const float held = fmaxf(r, -0x1p127f);
    return !(fabsf(r) >= kFarRef) ? r : fmaf(fabsf(held), 0x1p-19f, held);
  }
  static constexpr float kFarRef = 0x1p28f;
  PGK_HD float delta(float ref, float ref_new) const { return ref - ref_new; }
  PGK_HD double chunk_ref(float mz) const {
    return mz == neg_inf<float>() ? neg_inf<double>() : double(ref_of(mz)) * kLn2Double;
  }
  PGK_HD float clamp(float d2) const { return fmaxf(d2, exp_zero_below<float>() * kLog2e); }
  PGK_HD float exp(float d2) const { return hd_ex2(d2); }
  PGK_HD float add(float x, ThreadRun<float>& r) const {
    // d2 = (z - ref) log2e, clamped so -inf logits give e = 0 and e * d2 = 0.
    const float d2 = clamp(fmaf(x, c, -r.ref));
    const float e = hd_ex2(d2);
    r.s2 = fmaf(e, e, r.s2);
    r.t = fmaf(e, d2, r.t);
    return e;
  }
  PGK_HD float finish_t(float t) const { return hd_mul(t, kLn2); }
};
template <>
struct ForwardTerm<BF16> : ForwardTermFast {
  using ForwardTermFast::ForwardTermFast;
};
template <>
struct ForwardTerm<F16> : ForwardTermFast {
  using ForwardTermFast::ForwardTermFast;
};

// fp32 / fp64 logits: relative to the raw max, as the CPU rows (token_stats.cpp): the thread's
// "scaled" max is the raw logit itself (scale is the identity, so the argmax is the first index
// of the raw max), the reference is that raw logit, and d = (x - ref) / tau as the difference
// rounded once and times 1 / tau (FADD + FMUL, as many as z - m from z = x / tau): its error is
// relative to |d|, where z - m carried ulp(z) / 2 of each of z and m (~1e-6 at |z| ~ 20, plain
// PyTorch's error) on the terms near the max that decide log p, lse and the entropy. The max's
// own term is exactly e^0 = 1. fp32: accurate exp (~2-3 ulp), since fp32 gradients keep fp32
// precision.
template <typename acc_t>
struct ForwardTermRaw {
  acc_t inv_tau;
  PGK_HD explicit ForwardTermRaw(acc_t inv_tau_) { inv_tau = inv_tau_; }
  PGK_HD acc_t scale(acc_t x) const { return x; }
  PGK_HD acc_t ref_of(acc_t mx) const { return mx; }
  PGK_HD acc_t delta(acc_t ref, acc_t ref_new) const { return hd_mul(ref - ref_new, inv_tau); }
  PGK_HD double chunk_ref(acc_t mx) const { return double(mx) * double(inv_tau); }
  PGK_HD acc_t clamp(acc_t d) const { return hd_fmax(d, exp_zero_below<acc_t>()); }
  PGK_HD acc_t exp(acc_t d) const { return hd_exp_accurate(d); }
  PGK_HD acc_t add(acc_t x, ThreadRun<acc_t>& r) const {
    const acc_t d = clamp(hd_mul(x - r.ref, inv_tau));
    const acc_t e = hd_exp_accurate(d);
    r.s2 = fma_acc(e, e, r.s2);
    r.t = fma_acc(e, d, r.t);
    return e;
  }
  PGK_HD acc_t finish_t(acc_t t) const { return t; }
};
template <>
struct ForwardTerm<F32> : ForwardTermRaw<float> {
  using ForwardTermRaw<float>::ForwardTermRaw;
};
template <>
struct ForwardTerm<F64> : ForwardTermRaw<double> {
  using ForwardTermRaw<double>::ForwardTermRaw;
};

// ---------------------------------------------------------------------------------------------
// Warp reductions (xor butterflies; callers use lane 0's result, so the order is fixed).
template <typename T>
__device__ __forceinline__ T warp_max_nan(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_nan_acc(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = v + __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}
__device__ __forceinline__ int warp_min(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

// Row status, shared by forward partial, finalize and backward so they always agree.
enum class RowKind : int { kIgnored = 0, kInvalid = 1, kValid = 2 };

template <typename acc_t>
struct RowScalars {
  int label;  // meaningful for kValid rows only (then in [0, V))
  acc_t inv_tau;
  RowKind kind;
};

// Label and temperature of row r: ignore_index rows are kIgnored; a label outside [0, V) or a
// per-row temperature that is not finite and > 0 makes the row kInvalid (NaN outputs): never a
// trap or a host sync.
template <typename acc_t>
__device__ __forceinline__ RowScalars<acc_t> load_row_scalars(const RowInputs<acc_t>& in, int64_t r) {
  RowScalars<acc_t> s;
  const int64_t label = load_label(in.labels, in.labels_int32, r);
  s.label = static_cast<int>(label);
  s.inv_tau = in.inv_tau_scalar;
  bool ok = label >= 0 && label < in.V;
  if (in.temperature != nullptr) {
    const acc_t tau = __ldg(in.temperature + r);
    ok = ok && is_finite_positive(tau);
    s.inv_tau = reciprocal(tau);
  }
  s.kind = label == in.ignore_index ? RowKind::kIgnored : (ok ? RowKind::kValid : RowKind::kInvalid);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Forward, launch 1: partial state of every (row, chunk).
template <typename Tag, bool kAligned>
__global__ void __launch_bounds__(kMaxThreads, DTypeTraits<Tag>::kMinBlocksFwd)
    token_stats_partial_kernel(const ForwardParams<typename DTypeTraits<Tag>::acc_t> p) {
  using Tr = DTypeTraits<Tag>;
  using acc_t = typename Tr::acc_t;
  using bits_t = typename Tr::bits_t;
  __shared__ acc_t sh_max[kMaxWarps];
  __shared__ acc_t sh_s1[kMaxWarps];
  __shared__ acc_t sh_s2[kMaxWarps];
  __shared__ acc_t sh_t[kMaxWarps];
  __shared__ int sh_idx[kMaxWarps];
  __shared__ double sh_top[2];  // the top thread's fp64 s1, s2 (top_vector_sums)
  // fp64 logits' sums are double already.
  constexpr bool kTopSums = std::is_same<acc_t, float>::value;
  static_assert(kSteps * kUnroll == 32, "the top thread's vectors, one per lane of its warp");

  const RowInputs<acc_t>& in = p.in;
  const int T = blockDim.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n_warps = T >> 5;
  const int C = in.plan.n_chunks;
  const int V = static_cast<int>(in.V);
  const bits_t* logits = static_cast<const bits_t*>(in.logits);

  ItemCursor next;
  next.init(blockIdx.x, C, in.layout.n_inner);
  RowScalars<acc_t> next_rs{};
  if (next.row < in.N) next_rs = load_row_scalars(in, next.row);
  // One item per trip, never unrolled (.ci/check_cuda_budgets.py counts per trip).
#pragma unroll 1
  while (next.row < in.N) {
    const int64_t row = next.row;
    const int chunk = next.chunk;
    const int64_t row_offset = next.offset(in.layout);
    const RowScalars<acc_t> cur = next_rs;
    next.advance(in.walk, C, in.layout.n_inner);
    if (next.row < in.N) next_rs = load_row_scalars(in, next.row);  // prefetch
    if (cur.kind != RowKind::kValid) continue;  // uniform over the CTA; finalize fills the row

    // a) kSteps load steps of kUnroll 16-byte vectors each (8 loads in flight per thread per
    // step); per step the thread's running max (one packed max per 16-bit pair), one rescale of
    // its sums, then one exp per element relative to the thread's reference, in a fixed order
    // (step, vector u, element j). Slots past the chunk hold -inf: they add exactly +0.
    const int vec0 = chunk * in.plan.vecs_per_chunk;
    const int n_here = min(in.plan.vecs_per_chunk, in.plan.n_vecs - vec0);
    const bits_t* x = logits + row_offset;
    const ForwardTerm<Tag> term(cur.inv_tau);
    ThreadRun<acc_t> run = empty_run<acc_t>();
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      uint4 raw[kUnroll];
      load_item<Tag, kAligned>(raw, x, vec0, s * kUnroll * T, n_here, V, T, tid);
      run_step(run, thread_max<Tag>(raw), s, term);
      constexpr int kGroup = sum_group<Tag>();
#pragma unroll
      for (int i0 = 0; i0 < kUnroll * Tr::kVec; i0 += kGroup) {
        acc_t xs[kGroup];
#pragma unroll
        for (int i = 0; i < kGroup; ++i)
          xs[i] = element<Tag>(raw[(i0 + i) / Tr::kVec], (i0 + i) % Tr::kVec);
        run_add(term, xs, run);
      }
    }

    // b) the chunk's max, NaN-propagating, in logit units (the scaling by 1/tau > 0 is monotone).
    const acc_t wm = warp_max_nan(run.mx);
    if (lane == 0) sh_max[warp] = wm;
    __syncthreads();
    acc_t M = sh_max[0];
#pragma unroll
    for (int w = 1; w < kMaxWarps; ++w)  // bounded by a constant: no runtime-trip-count loop
      if (w < n_warps) M = max_nan_acc(M, sh_max[w]);
    // The chunk's max as the threads' mz (term.scale: the raw max, or its z for 16-bit logits).
    const acc_t m = term.scale(M);

    // c) every thread's sums relative to the chunk's reference (one exp per thread).
    run_rescale(run, term.ref_of(m), term);
    acc_t s1 = run.s1, s2 = run.s2;
    const acc_t t = term.finish_t(run.t);

    // The top thread (top_vector_sums): the first warp whose max is the chunk's (none for a NaN
    // chunk: w_top = -1, uniform over the CTA), its first lane at the max; that warp's lane l
    // loads the top thread's vector l here, before the argmax search, so the two reads overlap.
    int w_top = -1, tid_top = -1;
    uint4 top_raw = splat_bits<Tag>(Tr::kNegInfBits);
    if constexpr (kTopSums) {
      const bool warp_at_max = p.top_sums && lane < n_warps &&
                               term.scale(sh_max[lane & (kMaxWarps - 1)]) == m;
      w_top = __ffs(__ballot_sync(0xFFFFFFFFu, warp_at_max)) - 1;
      if (warp == w_top) {  // warp-uniform
        tid_top = warp * 32 + __ffs(__ballot_sync(0xFFFFFFFFu, run.mz == m)) - 1;
        const int v = (lane / kUnroll) * kUnroll * T + (lane % kUnroll) * T + tid_top;
        if (static_cast<unsigned>(v) < static_cast<unsigned>(n_here)) {  // never before the chunk
          top_raw = row_vector<Tag, kAligned>(x, vec0 + v, V);
        }
      }
    }

    // First index of the max, as the CPU (the raw logits; 16-bit logits compare their z, equal
    // only for equal logits). Only threads whose own max equals m can hold it (rarely more than
    // one per chunk), and only in the step where that max was first reached (run.step): they
    // read that step's vectors again (L1/L2 hits) in a loop that is not unrolled, element by
    // element in index order.
    int idx = INT_MAX;
    if (run.mz == m) {
      const int first = run.step * kUnroll * T + tid;
#pragma unroll 1
      for (int u = 0; u < kUnroll; ++u) {
        const int v = first + u * T;
        if (v >= n_here) break;
        const uint4 w = row_vector<Tag, kAligned>(x, vec0 + v, V);
        const int e0 = (vec0 + v) * Tr::kVec;
#pragma unroll
        for (int j = Tr::kVec - 1; j >= 0; --j)  // descending: the first match is written last
          if ((kAligned || e0 + j < V) && term.scale(element<Tag>(w, j)) == m) idx = e0 + j;
        if (idx != INT_MAX) break;
      }
    }

    if constexpr (kTopSums) {
      if (warp == w_top) {
        acc_t xs[Tr::kVec];
#pragma unroll
        for (int j = 0; j < Tr::kVec; ++j) xs[j] = element<Tag>(top_raw, j);
        double f1 = 0.0, f2 = 0.0;
        top_vector_sums(term, run, xs, f1, f2);
        f1 = warp_sum(f1);
        f2 = warp_sum(f2);
        if (lane == 0) {
          sh_top[0] = f1;
          sh_top[1] = f2;
        }
      }
      if (tid == tid_top) s1 = s2 = acc_t(0);  // its terms are in sh_top
    }

    // d) CTA reduction of (s1, s2, t, idx) in a fixed order.
    const acc_t w1 = warp_sum(s1), w2 = warp_sum(s2), wt = warp_sum(t);
    const int wi = warp_min(idx);
    if (lane == 0) {
      sh_s1[warp] = w1;
      sh_s2[warp] = w2;
      sh_t[warp] = wt;
      sh_idx[warp] = wi;
    }
    __syncthreads();
    if (warp == 0) {  // warp partials folded by an xor butterfly over kMaxWarps lanes
      const bool has = lane < n_warps;
      acc_t a1 = has ? sh_s1[lane] : acc_t(0), a2 = has ? sh_s2[lane] : acc_t(0);
      acc_t at = has ? sh_t[lane] : acc_t(0);
      int ai = has ? sh_idx[lane] : INT_MAX;
#pragma unroll
      for (int o = kMaxWarps / 2; o > 0; o >>= 1) {
        a1 = a1 + __shfl_xor_sync(0xFFFFFFFFu, a1, o);
        a2 = a2 + __shfl_xor_sync(0xFFFFFFFFu, a2, o);
        at = at + __shfl_xor_sync(0xFFFFFFFFu, at, o);
        ai = min(ai, __shfl_xor_sync(0xFFFFFFFFu, ai, o));
      }
      if (lane == 0) {
        const int64_t o = int64_t(chunk) * in.N + row;
        p.ws_m[o] = m;
        const bool top = kTopSums && w_top >= 0;
        p.ws_s1[o] = double(a1) + (top ? sh_top[0] : 0.0);
        p.ws_s2[o] = double(a2) + (top ? sh_top[1] : 0.0);
        p.ws_t[o] = at;
        p.ws_idx[o] = ai;
      }
    }
    // The next item's writes to sh_max happen after this item's second barrier, and its writes to
    // sh_s1.. after its own first barrier, which warp 0 reaches only after the reads above.
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, launch 2 (also usable on the host): fold the C partial states of one row in chunk
// order and finish the row. Partial arrays are [C][N]; chunk k of row r is at k * N + r.
template <typename acc_t>
struct FinalRow {
  TokenStatsRow<acc_t> stats;
  int64_t argmax;
};

// A row's partial states merged in double (the approximate fp32 exp/log of --use_fast_math never
// touch an output), in a fixed order (chunk 0 first), so the result is deterministic. Chunk k's
// sums are relative to its reference in z units, term.chunk_ref(m_k) of the chunk's ws_m: for
// fp32 / fp64 logits the raw max times 1 / tau (ForwardTermRaw), exact in double for fp32; for
// 16-bit logits the base-2 reference the kernel rounded, ref_k = fl(m_k log2e)
// (ForwardTermFast::ref_of), taken exactly as ref_k ln 2 (relative to m_k, chunk k's sums were off
// by 2^(m_k log2e - ref_k), up to 2^-24 |ref_k| in the exponent: ~7e-7 relative at |z| ~ 20,
// a different factor per chunk). m_max: the largest ws_m, that of the chunk holding the argmax
// (the raw max logit for fp32 / fp64, its z for 16-bit logits).
struct FoldedRow {
  SoftmaxState<double> s;
  int64_t argmax;
  double m_max;
};

template <typename Term, typename acc_t>
PGK_HD FoldedRow fold_row(const Term& term, const acc_t* ws_m, const double* ws_s1,
                          const double* ws_s2, const acc_t* ws_t, const int32_t* ws_idx, int64_t C,
                          int64_t N, int64_t r) {
  FoldedRow f{empty_state<double>(), 0, neg_inf<double>()};
  for (int64_t k = 0; k < C; ++k) {
    const int64_t o = k * N + r;
    const SoftmaxState<double> part{term.chunk_ref(ws_m[o]), ws_s1[o], ws_s2[o], double(ws_t[o])};
    if (double(ws_m[o]) > f.m_max) {  // strictly greater: the first chunk holding the max wins
      f.m_max = double(ws_m[o]);
      f.argmax = ws_idx[o];
    }
    f.s = merge(f.s, part);
  }
  if (!state_is_valid(f.s)) f.argmax = -1;
  return f;
}

template <typename acc_t>
PGK_HD FinalRow<acc_t> rounded_final(const TokenStatsRow<double>& d, int64_t argmax) {
  FinalRow<acc_t> out;
  out.stats = {acc_t(d.logprob), acc_t(d.entropy), acc_t(d.collision), acc_t(d.lgp),
               acc_t(d.lse),     acc_t(d.max_prob)};
  out.argmax = argmax;
  return out;
}

// fp32 / fp64 logits, from fold_row and the label's raw logit: the max's term is exactly 1, and
// the label's d relative to the max is the raw logits' difference (exact in double for fp32)
// times 1 / tau, so log p_c is off the truth by the sums' rounding only.
template <typename acc_t>
PGK_HD FinalRow<acc_t> finalize_row(const FoldedRow& f, const ForwardTermRaw<acc_t>& term,
                                    acc_t x_label) {
  const double d_label =
      state_is_valid(f.s) ? (double(x_label) - f.m_max) * double(term.inv_tau) : 0.0;
  return rounded_final<acc_t>(finalize_token_stats_relative(f.s, d_label), f.argmax);
}

// 16-bit logits, from fold_row and the raw logits at the argmax (x_max) and the label.
// The max entered the sums as e_m = ex2(eps), eps = fma(x_max, c, -ref) the rounding residual of
// its base-2 exponent (ForwardTermFast::add, the same instructions, so the same bits), not as 1:
// the row is finished relative to that term (MaxTerm), so max_prob = e_m / s1 <= 1 and the
// residual cancels in lse and log p_c (taken as l_m); the label's z relative to the max's from
// the raw logits' exact difference, (x_c - x_max) times the row's 1 / tau in double.
PGK_HD FinalRow<float> finalize_row_fast(const FoldedRow& f, const ForwardTermFast& term,
                                         float x_max, float x_label) {
  SoftmaxState<double> s = f.s;
  MaxTerm<double> max{1.0, 0.0, 0.0};
  double d_label = 0.0;
  if (state_is_valid(s)) {
    const float eps = fmaf(x_max, term.c, -term.ref_of(float(f.m_max)));
    const double e_m = double(term.exp(term.clamp(eps)));
    max = {e_m, std::log(e_m), double(eps) * double(kLn2)};  // t holds e_m eps in units of kLn2
    s.m = double(x_max) * double(term.inv_tau);
    d_label = (double(x_label) - double(x_max)) * double(term.inv_tau);
  }
  return rounded_final<float>(finalize_token_stats_relative(s, d_label, max), f.argmax);
}

// A row finished exactly from its raw logits in double: the first index of the max logit, then the
// sums relative to it, d_j = (x_j - x_max) / tau. load(j) is the row's logit j. One thread reads
// the row twice: only for the rare rows finish_row sends here. NaN, +inf and all -inf rows are
// NaN / -1 as everywhere else.
template <typename Load>
PGK_HD FinalRow<float> exact_row(Load load, int64_t V, float inv_tau, int64_t label) {
  double x_max = neg_inf<double>();
  int64_t argmax = -1;
  bool nan = false;
  for (int64_t j = 0; j < V; ++j) {
    const double v = load(j);
    nan = nan || v != v;
    if (v > x_max) {
      x_max = v;
      argmax = j;
    }
  }
  SoftmaxState<double> s = empty_state<double>();
  if (!nan && x_max > neg_inf<double>() && x_max < -neg_inf<double>()) {
    s = {x_max * double(inv_tau), 0.0, 0.0, 0.0};
    for (int64_t j = 0; j < V; ++j) {
      const double d = (double(load(j)) - x_max) * double(inv_tau);
      if (d == neg_inf<double>()) continue;
      const double e = ::exp(d);
      s.s1 += e;
      s.s2 += e * e;
      s.t += e * d;
    }
  }
  if (!state_is_valid(s)) argmax = -1;
  const double d_label = state_is_valid(s) ? (double(load(label)) - x_max) * double(inv_tau) : 0.0;
  return rounded_final<float>(finalize_token_stats_relative(s, d_label), argmax);
}

// Whether a 16-bit row's saved L is too far out for BackwardTermFast (or not finite): its
// exponent x c - fl(L log2e) rounds by ~|L log2e| 2^-24 (and c's rounding as much again), a
// relative error on every p_j. From |L log2e| = 2^11 (|L| ~ 1420) that is 2^-12, near fp16's half
// ulp, and the row's gradient is taken relative to its raw max instead
// (token_stats_backward_far_kernel). At the forward's kFarRef (2^28) this switch let p_j of rows
// at L = -6.6e4 through 1.7 bf16 half ulps off, at L = -1e6 22 (an fp16 vocabulary masked whole
// with finfo.min at tau 0.7 has L = -9.4e4). Rows that far out are masked, or scaled far beyond a
// model's logits.
constexpr float kFarLse = 0x1p11f;
PGK_HD bool far_lse(float lse) { return !(fabsf(hd_mul(lse, kLog2e)) < kFarLse); }

// A row's outputs from its folded partial states, as token_stats_finalize_kernel computes them.
// load(j) gives the row's logit j (one more read per row for the label, and for 16-bit logits the
// max at the argmax). A 16-bit row whose chunks kept no term (s1 = 0: every chunk lies beyond
// kFarRef, a vocabulary masked whole with -1e30 or finfo.min, or no finite logit) is finished by
// exact_row from the raw logits instead.
template <typename Tag, typename Load>
PGK_HD FinalRow<typename DTypeTraits<Tag>::acc_t> finish_row(const ForwardTerm<Tag>& term,
                                                              const FoldedRow& folded, Load load,
                                                              int64_t V, int64_t label) {
  if constexpr (DTypeTraits<Tag>::kPacked16) {
    if (!(folded.s.s1 > 0.0) && folded.s.m == folded.s.m) {
      return exact_row(load, V, term.inv_tau, label);
    }
    const float x_max = folded.argmax >= 0 ? float(load(folded.argmax)) : 0.0f;
    return finalize_row_fast(folded, term, x_max, float(load(label)));
  } else {
    return finalize_row(folded, term, load(label));
  }
}

template <typename Tag>
__global__ void __launch_bounds__(kFinalizeThreads)
    token_stats_finalize_kernel(const ForwardParams<typename DTypeTraits<Tag>::acc_t> p) {
  using Tr = DTypeTraits<Tag>;
  using acc_t = typename Tr::acc_t;
  using bits_t = typename Tr::bits_t;
  const RowInputs<acc_t>& in = p.in;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < in.N;
       r += int64_t(gridDim.x) * blockDim.x) {
    const RowScalars<acc_t> rs = load_row_scalars(in, r);
    FinalRow<acc_t> f;
    if (rs.kind == RowKind::kIgnored) {
      f.stats = {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      f.argmax = 0;
    } else if (rs.kind == RowKind::kInvalid) {
      const acc_t nan = quiet_nan<acc_t>();
      f.stats = {nan, nan, nan, nan, nan, nan};
      f.argmax = -1;
    } else {
      const bits_t* x = static_cast<const bits_t*>(in.logits) + in.layout.offset(r);
      const ForwardTerm<Tag> term(rs.inv_tau);
      const FoldedRow folded =
          fold_row(term, p.ws_m, p.ws_s1, p.ws_s2, p.ws_t, p.ws_idx, in.plan.n_chunks, in.N, r);
      f = finish_row(term, folded, [x](int64_t j) { return bits_to_acc<Tag>(__ldg(x + j)); },
                     in.V, rs.label);
    }
    p.logprob[r] = f.stats.logprob;
    p.entropy[r] = f.stats.entropy;
    p.collision[r] = f.stats.collision;
    p.lgp[r] = f.stats.lgp;
    p.lse[r] = f.stats.lse;
    p.max_prob[r] = f.stats.max_prob;
    p.argmax[r] = f.argmax;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: dz_j / tau for one (row, chunk) per CTA iteration.
//
// With d_j = z_j - L = log p_j and the coefficients of softmax_stats.h:
//   g_l  (1[j=c] - p_j)          d/dz_j of logprob   = z_c - L
//   g_H  (-p_j (d_j + H))        d/dz_j of entropy   = -sum p log p
//   g_C  (2 p_j (p_j - C))       d/dz_j of collision = sum p^2
//   g_L  p_j                     d/dz_j of lse       = log sum e^z
//   sum = p_j (a + b d_j + c p_j) + g_l 1[j=c];  a, b, c (and g_l at the label) divided by tau.
// Per-element gradient. kFast (16-bit logits): base-2 exponent from one FFMA, b pre-multiplied by
// ln 2 so that b d = (b ln2) d2. Otherwise d and p rounded as in the forward of the same dtype.
template <typename Tag>
struct BackwardTerm;

template <typename Tag>
struct BackwardTermFast {
  float c2, bl, a, b, c;  // log2e / tau, L log2e, a / tau, b ln2 / tau, c / tau
  // From the saved L: its rounding (ulp(L) / 2 relative on p) is far below the 16-bit gradient's.
  PGK_HD BackwardTermFast(float inv_tau, float lse, float /*x_max*/, float /*log_s1*/,
                          const TokenStatsGradCoef<float>& k) {
    c2 = hd_mul(inv_tau, kLog2e);
    bl = hd_mul(lse, kLog2e);
    a = hd_mul(k.a, inv_tau);
    b = hd_mul(hd_mul(k.b, inv_tau), kLn2);
    c = hd_mul(k.c, inv_tau);
  }
  PGK_HD float grad(float x) const {
    const float d2 = fmaxf(fmaf(x, c2, -bl), min_d2_fast());  // (z - L) log2e, finite
    const float pj = hd_ex2(d2);
    return hd_mul(pj, fmaf(c, pj, fmaf(b, d2, a)));  // p (a + b d + c p) / tau
  }
};
template <>
struct BackwardTerm<BF16> : BackwardTermFast<BF16> {
  using BackwardTermFast<BF16>::BackwardTermFast;
};
template <>
struct BackwardTerm<F16> : BackwardTermFast<F16> {
  using BackwardTermFast<F16>::BackwardTermFast;
};
// fp32 / fp64: log p_j relative to the row max, d = (x - x_max) / tau - log s1 as one FADD and
// one FFMA (x_max = the raw logit at the saved argmax, log s1 = -log(max_prob)): the rounding is
// relative to |x - x_max| and |d|, so p ~ 1 is exact to ~1e-7. Not z - L: the saved L carries
// ulp(L) / 2 (1.9e-6 in fp32 at L ~ 40), that relative error on every p_j.
template <>
struct BackwardTerm<F32> {
  float inv_tau, x_max, log_s1, a, b, c;
  PGK_HD BackwardTerm(float inv_tau_, float /*lse*/, float x_max_, float log_s1_,
                      const TokenStatsGradCoef<float>& k) {
    inv_tau = inv_tau_;
    x_max = x_max_;
    log_s1 = log_s1_;
    a = hd_mul(k.a, inv_tau_);
    b = hd_mul(k.b, inv_tau_);
    c = hd_mul(k.c, inv_tau_);
  }
  PGK_HD float grad(float x) const {
    const float d = fmaxf(fmaf(hd_sub(x, x_max), inv_tau, -log_s1), min_d32());
    const float pj = hd_exp_accurate(d);
    return hd_mul(pj, fmaf(c, pj, fmaf(b, d, a)));
  }
};
template <>
struct BackwardTerm<F64> {
  double inv_tau, x_max, log_s1, a, b, c;
  __device__ __forceinline__ BackwardTerm(double inv_tau_, double /*lse*/, double x_max_,
                                          double log_s1_, const TokenStatsGradCoef<double>& k)
      : inv_tau(inv_tau_), x_max(x_max_), log_s1(log_s1_), a(k.a * inv_tau_), b(k.b * inv_tau_),
        c(k.c * inv_tau_) {}
  __device__ __forceinline__ double grad(double x) const {
    const double d = fmax(fma(__dsub_rn(x, x_max), inv_tau, -log_s1), min_d64());
    const double pj = ::exp(d);
    return __dmul_rn(pj, fma(c, pj, fma(b, d, a)));
  }
};

// The label's entry: (p_c (a + b d_c + c p_c) + g_l) / tau with d_c relative to the row max (as
// BackwardTerm<F32>), in acc_t and with an accurate exp, then rounded once. Runs for one element
// per row.
template <typename acc_t>
PGK_HD acc_t label_grad(acc_t x_c, acc_t inv_tau, acc_t x_max, acc_t log_s1,
                        const TokenStatsGradCoef<acc_t>& k, acc_t g_logprob) {
  if constexpr (std::is_same_v<acc_t, float>) {
    const float d = fmaxf(fmaf(hd_sub(x_c, x_max), inv_tau, -log_s1), min_d32());
    const float pc = hd_exp_accurate(d);
    return hd_mul(fmaf(pc, fmaf(k.c, pc, fmaf(k.b, d, k.a)), g_logprob), inv_tau);
  } else {
    const double d = fmax(fma(hd_sub(x_c, x_max), inv_tau, -log_s1), min_d64());
    const double pc = ::exp(d);
    return hd_mul(fma(pc, fma(k.c, pc, fma(k.b, d, k.a)), g_logprob), inv_tau);
  }
}

// The label's entry of 16-bit logits, from the saved L (fp32: d_c = z_c - L): for a row whose
// saved state is not a finished forward's (label_grad16 cannot take its max).
PGK_HD float label_grad_from_lse(float x_c, float inv_tau, float lse,
                                 const TokenStatsGradCoef<float>& k, float g_logprob) {
  const float d = fmaxf(hd_sub(hd_mul(x_c, inv_tau), lse), min_d32());
  const float pc = hd_exp_accurate(d);
  return hd_mul(fmaf(pc, fmaf(k.c, pc, fmaf(k.b, d, k.a)), g_logprob), inv_tau);
}

// The label's entry of 16-bit logits in double, relative to the row max (x_max, the logit at the
// saved argmax; log s1 = -log max_prob), as the C++ and Triton backwards take it. From L in fp32
// (label_grad_from_lse) its g_l (1 - p_c) kept ulp(L) / 2 of L: a confident token's entry (1 - p_c
// 1e-3 .. 1e-5) 3-12 % off at z_c 20-80 (plain fp32 PyTorch's error), 0.4-1.7 % from the max in
// fp32. Once per row: off the per-element budget.
PGK_HD float label_grad16(float x_c, float inv_tau, float x_max, float max_prob,
                          const TokenStatsGradCoef<float>& k, float g_logprob) {
  const TokenStatsGradCoef<double> k64{double(k.a), double(k.b), double(k.c)};
  return float(label_grad<double>(double(x_c), double(inv_tau), double(x_max),
                                  -::log(double(max_prob)), k64, double(g_logprob)));
}

template <typename Tag, bool kAligned>
__global__ void __launch_bounds__(kMaxThreads, DTypeTraits<Tag>::kMinBlocks)
    token_stats_backward_kernel(const BackwardParams<typename DTypeTraits<Tag>::acc_t> p) {
  using Tr = DTypeTraits<Tag>;
  using acc_t = typename Tr::acc_t;
  using bits_t = typename Tr::bits_t;
  const RowInputs<acc_t>& in = p.in;
  const int T = blockDim.x;
  const int tid = threadIdx.x;
  const int C = in.plan.n_chunks;
  const int V = static_cast<int>(in.V);
  const bits_t* logits = static_cast<const bits_t*>(in.logits);
  bits_t* grad = static_cast<bits_t*>(p.grad);

  ItemCursor next;
  next.init(blockIdx.x, C, in.layout.n_inner);
  RowScalars<acc_t> next_rs{};
  if (next.row < in.N) next_rs = load_row_scalars(in, next.row);
  // One item per trip, never unrolled (.ci/check_cuda_budgets.py counts per trip).
#pragma unroll 1
  while (next.row < in.N) {
    const int64_t row = next.row;
    const int chunk = next.chunk;
    const int64_t row_offset = next.offset(in.layout);
    const RowScalars<acc_t> cur = next_rs;
    next.advance(in.walk, C, in.layout.n_inner);
    if (next.row < in.N) next_rs = load_row_scalars(in, next.row);  // prefetch

    bits_t* g_row = grad + row * in.V;  // the gradient is a fresh contiguous [N, V] tensor
    const int vec0 = chunk * in.plan.vecs_per_chunk;
    const int n_here = min(in.plan.vecs_per_chunk, in.plan.n_vecs - vec0);

    acc_t lse = 0, entropy = 0, collision = 0, g_logprob = 0, g_entropy = 0, g_collision = 0,
          g_lse = 0, x_max = 0, log_s1 = 0;
    uint4 raw[kUnroll];
    RowKind kind = cur.kind;
    // The first step's logit loads and the row's saved statistics / upstream grads go out
    // together: the scalars' latency hides behind the vectors'. Ignored and invalid rows read no
    // logit (their slots hold -inf).
    const int n_read = kind == RowKind::kValid ? n_here : 0;
    load_item<Tag, kAligned>(raw, logits + row_offset, vec0, 0, n_read, V, T, tid);
    if (kind == RowKind::kValid) {
      lse = __ldg(p.lse + row);
      entropy = __ldg(p.entropy + row);
      collision = __ldg(p.collision + row);
      g_logprob = __ldg(p.g_logprob + row);
      g_entropy = __ldg(p.g_entropy + row);
      g_collision = __ldg(p.g_collision + row);
      g_lse = __ldg(p.g_lse + row);
      if constexpr (Tr::kPacked16) {
        // A row whose forward was NaN (NaN / +inf logits, all -inf) has a non-finite L; so has
        // a vocabulary masked whole with finfo.min at tau < 1 (L overflows fp32): launch 2
        // writes that row again from its raw max.
        if (!(fabs(lse) < -neg_inf<acc_t>())) kind = RowKind::kInvalid;
      } else {
        // fp32 / fp64 work relative to the row max (BackwardTerm): m from the saved argmax,
        // log s1 from max_prob. A saved state that is not a finished forward row's (argmax out
        // of range, max_prob not in (0, 1]) makes the row NaN, and nothing out of it is read.
        // (16-bit logits keep to L: these loads and the log cost 0.4 instructions per element,
        // over the backward's budget, for an error far below the 16-bit gradient's rounding.)
        const int64_t am = __ldg(p.argmax + row);
        const acc_t max_prob = __ldg(p.max_prob + row);
        if (!(am >= 0 && am < in.V) || !(max_prob > acc_t(0) && max_prob <= acc_t(1))) {
          kind = RowKind::kInvalid;
        } else {
          x_max = bits_to_acc<Tag>(__ldg(logits + row_offset + am));
          log_s1 = acc_t(-::log(double(max_prob)));  // double: no fast-math logf
        }
      }
    }
    const TokenStatsGradCoef<acc_t> coef =
        token_stats_grad_coef(g_logprob, g_entropy, g_collision, g_lse, entropy, collision);
    const BackwardTerm<Tag> term(cur.inv_tau, lse, x_max, log_s1, coef);
    // One store loop for every row kind: the gradient of a valid row, or the fill of an ignored
    // (0) or invalid (NaN) row, selected per vector (the gradient computed there is discarded).
    // Stores mirror load_item: kAligned (the gradient rows are then aligned too): one 16-byte
    // store per vector from one base pointer; otherwise element-wise.
    const bool valid = kind == RowKind::kValid;
    const uint4 fill = splat_bits<Tag>(kind == RowKind::kIgnored ? bits_t(0) : Tr::kNaNBits);
    uint4* dst = reinterpret_cast<uint4*>(g_row) + vec0 + tid;
    // kSteps steps of kUnroll vectors (unrolled): step s covers vectors s * kUnroll * T + u * T +
    // tid of the chunk; the next step's loads are issued after this step's stores.
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int first = s * kUnroll * T;
      if (s > 0) load_item<Tag, kAligned>(raw, logits + row_offset, vec0, first, n_read, V, T, tid);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int v = first + u * T + tid;
        if (v < n_here) {
          acc_t gv[Tr::kVec];
#pragma unroll
          for (int j = 0; j < Tr::kVec; ++j) gv[j] = term.grad(element<Tag>(raw[u], j));
          const uint4 out = valid ? pack_vector<Tag>(gv) : fill;
          if constexpr (kAligned) {
            dst[first + u * T] = out;
          } else {
            store_vector<Tag>(g_row, vec0 + v, V, out);
          }
        }
      }
    }
    // The label's entry gets g_l too: the thread that stored the label's vector (vector lv of the
    // chunk, lv = u * T + tid) overwrites that one element, after its own store of the vector
    // (program order), with the label's gradient computed once (label_grad), rounded once.
    // (lv = (s * kUnroll + u) * T + tid for some step s and slot u.) 16-bit logits: launch 2
    // writes it (label_grad16: in double from the row max, whose loads would cost this loop).
    if constexpr (!Tr::kPacked16) {
      if (!valid) continue;
      const int lv = cur.label / Tr::kVec - vec0;
      if (lv >= tid && lv < n_here && (lv - tid) % T == 0) {
        const acc_t x_c = bits_to_acc<Tag>(__ldg(logits + row_offset + cur.label));
        g_row[cur.label] =
            acc_to_bits<Tag>(label_grad(x_c, cur.inv_tau, x_max, log_s1, coef, g_logprob));
      }
    }
  }
}

// Backward, launch 2 (16-bit logits only). Every valid row's label entry (label_grad16, one thread:
// launch 1 writes the label's p_j term only). And the rows whose saved L lies beyond kFarLse
// (far_lse; rows finished by exact_row, a vocabulary masked whole with -1e30 or finfo.min), whose
// gradient launch 1 cannot form from L (x c - fl(L log2e) rounds by ~|L log2e| 2^-24 relative on
// p: 2^77 at -1e30; an L that rounded to -inf made the row NaN there): each is written again,
// relative to its raw max as the fp32 rows are (BackwardTerm<F32>, label_grad): x_max at the
// saved argmax, log s1 = -log(max_prob). One CTA per row, grid-stride. A far row with no finished
// forward (argmax out of range, max_prob not in (0, 1]) keeps launch 1's NaN fill; a near one
// gets its label entry from L.
template <typename Tag>
__global__ void __launch_bounds__(kFinalizeThreads)
    token_stats_backward_far_kernel(const BackwardParams<float> p) {
  using bits_t = typename DTypeTraits<Tag>::bits_t;
  const RowInputs<float>& in = p.in;
  const bits_t* logits = static_cast<const bits_t*>(in.logits);
  bits_t* grad = static_cast<bits_t*>(p.grad);
  for (int64_t row = blockIdx.x; row < in.N; row += gridDim.x) {
    const RowScalars<float> rs = load_row_scalars(in, row);
    if (rs.kind != RowKind::kValid) continue;
    const float lse = __ldg(p.lse + row);
    const bool far = far_lse(lse);
    if (!far && threadIdx.x != 0) continue;  // the label's entry alone: one thread
    const int64_t am = __ldg(p.argmax + row);
    const float max_prob = __ldg(p.max_prob + row);
    const bool finished = am >= 0 && am < in.V && max_prob > 0.0f && max_prob <= 1.0f;
    if (far && !finished) continue;
    const bits_t* x = logits + in.layout.offset(row);
    const float g_logprob = __ldg(p.g_logprob + row);
    const TokenStatsGradCoef<float> coef =
        token_stats_grad_coef(g_logprob, __ldg(p.g_entropy + row), __ldg(p.g_collision + row),
                              __ldg(p.g_lse + row), __ldg(p.entropy + row),
                              __ldg(p.collision + row));
    bits_t* g_row = grad + row * in.V;
    if (!far) {
      const float x_c = bits_to_acc<Tag>(__ldg(x + rs.label));
      g_row[rs.label] = acc_to_bits<Tag>(
          finished
              ? label_grad16(x_c, rs.inv_tau, bits_to_acc<Tag>(__ldg(x + am)), max_prob, coef,
                             g_logprob)
              : label_grad_from_lse(x_c, rs.inv_tau, lse, coef, g_logprob));
      continue;
    }
    const float x_max = bits_to_acc<Tag>(__ldg(x + am));
    const float log_s1 = float(-::log(double(max_prob)));  // double: no fast-math logf
    const BackwardTerm<F32> term(rs.inv_tau, lse, x_max, log_s1, coef);
    for (int64_t j = threadIdx.x; j < in.V; j += blockDim.x) {
      const float xj = bits_to_acc<Tag>(__ldg(x + j));
      const float g = j == rs.label ? label_grad(xj, rs.inv_tau, x_max, log_s1, coef, g_logprob)
                                    : term.grad(xj);
      g_row[j] = acc_to_bits<Tag>(g);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host-side launchers (no torch). They size the grid from the device and launch on `stream`;
// they return the first launch error (the caller turns it into an exception).

// `slot` once it holds a value, else `query()` (a count >= 1, or < 1 when the query failed),
// stored in `slot` only on success. A failed query falls back to 1 and is asked again on the next
// call, so a transient failure (a CUDA error left pending by other code, a device not yet set up)
// cannot pin a launch configuration for the life of the process. `slot` may be null (no cache).
template <typename Query>
inline int cached_count(std::atomic<int>* slot, Query query) {
  if (slot != nullptr) {
    const int hit = slot->load(std::memory_order_relaxed);
    if (hit > 0) return hit;
  }
  const int n = query();
  if (n < 1) return 1;
  if (slot != nullptr) slot->store(n, std::memory_order_relaxed);
  return n;
}

constexpr int kMaxDevices = 64;  // devices with a cache slot; others query every time

// Resident CTAs per SM of `kernel` at `threads`, cached per (kernel, device, warps). The kernel
// is a template argument so that every kernel instantiation gets its own cache (several share
// one function-pointer type but not one register count).
template <auto kernel>
inline int resident_ctas_per_sm(int device, int threads) {
  static std::atomic<int> cache[kMaxDevices][kMaxWarps + 1];  // 0 = not known yet
  const int w = threads / 32;
  const bool cacheable = device >= 0 && device < kMaxDevices && w >= 1 && w <= kMaxWarps;
  return cached_count(cacheable ? &cache[device][w] : nullptr, [&] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0) != cudaSuccess) {
      (void)cudaGetLastError();  // not fatal: this launch takes 1 CTA per SM, the next asks again
      return 0;
    }
    return n;
  });
}

inline int sm_count(int device) {
  static std::atomic<int> cache[kMaxDevices];  // 0 = not known yet
  const bool cacheable = device >= 0 && device < kMaxDevices;
  return cached_count(cacheable ? &cache[device] : nullptr, [&] {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return n;
  });
}

// Persistent grid: every item gets a CTA when there are few; otherwise SMs x resident CTAs.
template <auto kernel>
inline unsigned int persistent_grid(int device, int threads, int64_t n_items) {
  const int64_t full = int64_t(sm_count(device)) * resident_ctas_per_sm<kernel>(device, threads);
  const int64_t g = n_items < full ? n_items : full;
  return static_cast<unsigned int>(g < 1 ? 1 : g);
}

template <typename Tag>
cudaError_t launch_token_stats_forward(const ForwardParams<typename DTypeTraits<Tag>::acc_t>& p,
                                       bool aligned, int device, cudaStream_t stream) {
  const RowInputs<typename DTypeTraits<Tag>::acc_t>& in = p.in;
  if (in.N <= 0) return cudaSuccess;
  const int threads = in.plan.threads;
  const int64_t n_items = in.N * in.plan.n_chunks;
  ForwardParams<typename DTypeTraits<Tag>::acc_t> q = p;
  // The vector kernel needs whole vectors too (no partial last vector): V % kVec == 0.
  if (aligned && in.V % DTypeTraits<Tag>::kVec == 0) {
    constexpr auto k = token_stats_partial_kernel<Tag, true>;
    const unsigned int grid = persistent_grid<k>(device, threads, n_items);
    q.in.walk = make_grid_walk(grid, in.plan.n_chunks, in.layout.n_inner);
    k<<<grid, threads, 0, stream>>>(q);
  } else {
    constexpr auto k = token_stats_partial_kernel<Tag, false>;
    const unsigned int grid = persistent_grid<k>(device, threads, n_items);
    q.in.walk = make_grid_walk(grid, in.plan.n_chunks, in.layout.n_inner);
    k<<<grid, threads, 0, stream>>>(q);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t blocks = (in.N + kFinalizeThreads - 1) / kFinalizeThreads;
  const int64_t cap = int64_t(sm_count(device)) * 16;
  token_stats_finalize_kernel<Tag>
      <<<static_cast<unsigned int>(blocks < cap ? blocks : cap), kFinalizeThreads, 0, stream>>>(q);
  return cudaGetLastError();
}

template <typename Tag>
cudaError_t launch_token_stats_backward(const BackwardParams<typename DTypeTraits<Tag>::acc_t>& p,
                                        bool aligned, int device, cudaStream_t stream) {
  const RowInputs<typename DTypeTraits<Tag>::acc_t>& in = p.in;
  if (in.N <= 0 || in.V <= 0) return cudaSuccess;
  const int threads = in.plan.threads;
  const int64_t n_items = in.N * in.plan.n_chunks;
  BackwardParams<typename DTypeTraits<Tag>::acc_t> q = p;
  // The vector kernel needs whole vectors too (no partial last vector): V % kVec == 0.
  if (aligned && in.V % DTypeTraits<Tag>::kVec == 0) {
    constexpr auto k = token_stats_backward_kernel<Tag, true>;
    const unsigned int grid = persistent_grid<k>(device, threads, n_items);
    q.in.walk = make_grid_walk(grid, in.plan.n_chunks, in.layout.n_inner);
    k<<<grid, threads, 0, stream>>>(q);
  } else {
    constexpr auto k = token_stats_backward_kernel<Tag, false>;
    const unsigned int grid = persistent_grid<k>(device, threads, n_items);
    q.in.walk = make_grid_walk(grid, in.plan.n_chunks, in.layout.n_inner);
    k<<<grid, threads, 0, stream>>>(q);
  }
  if constexpr (DTypeTraits<Tag>::kPacked16) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const int64_t cap = int64_t(sm_count(device)) * 16;
    token_stats_backward_far_kernel<Tag>
        <<<static_cast<unsigned int>(in.N < cap ? in.N : cap), kFinalizeThreads, 0, stream>>>(q);
  }
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace pg_kernels
