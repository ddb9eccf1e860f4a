// Host-side sanity test of the host-callable parts of token_stats.cuh; needs no GPU and no torch.
// Built and run by .ci/check_cuda.sh. It does not emulate the kernels: it checks the pieces of
// their contract that are plain arithmetic shared with the host:
//   1. plan_chunks: chunks cover each row exactly, depend on (V, dtype) only, stay within the
//      128 KiB / 256-thread budget, no chunk is empty and no warp of a CTA is idle.
//   2. ItemCursor + make_grid_walk: the division-free walk visits exactly the items
//      blockIdx.x + k * gridDim.x with the right (row, chunk, row offset).
//   3. finalize_row: folding per-chunk partial states (computed here in double straight from the
//      definitions of docs/math.md §1) gives the one-pass row statistics, the first argmax across
//      chunk boundaries, and NaN / -1 for NaN, +inf and all -inf rows.
//   4. The forward partial kernel's per-thread math (ThreadRun, run_step, run_rescale,
//      ForwardTerm<BF16 / F32>::add, the same functions the kernel calls, with exact exp2 for
//      ex2.approx): random chunks (-inf runs, ties, the max in a late step, NaN, +inf) fed through
//      the kernel's thread / step / slot layout and the CTA merge (max, rescale to the chunk's
//      reference, fixed-order sums, first-argmax search in the recorded step only) against a
//      double reference of lse, entropy, collision and the exact first argmax.
//   5. 16-bit and fp32 rows end to end: every chunk through the kernel's per-thread functions and
//      CTA sums, then fold_row<true> / finalize_row_fast, against float64 from the raw logits
//      (random, shifted to |z| ~ 1000, peaked, near one-hot, ties, -inf runs, vocabulary masked
//      with finfo.min or -1e30; 1-3 chunks); and each row's backward (BackwardTerm<Tag>::grad and
//      the label's entry, from the forward's saved statistics, random upstream gradients).
//   6. cached_count (the occupancy and SM-count caches of the launchers): a failed query falls
//      back to 1 and is asked again next time; a successful one is cached and asked once.
//      Without a GPU the real occupancy query fails: that fallback is checked too.
//   7. The label's entry of confident bf16 rows (label_grad16): within max_prob's own error.
//   8. The backward of bf16 rows far from 0, by the path far_lse picks: p_j within 2^-11.
//   9. Peaked bf16 and fp32 rows with runner-ups: lgp, entropy and log p within 1e-9 absolute
//      plus 2^-20 relative (the top thread's fp64 sums, top_vector_sums).
//  10. Confident rows: entropy and log p within 1e-9 absolute; lgp of 1e-7 .. 1e-17 within
//      1e-3 relative.
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "../token_stats.cuh"

using namespace pg_kernels;
using namespace pg_kernels::gpu;

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond, ...)                                         \
  do {                                                           \
    ++g_checks;                                                  \
    if (!(cond)) {                                               \
      ++g_failures;                                              \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                  \
      std::printf("\n");                                         \
      if (g_failures > 20) std::exit(1);                         \
    }                                                            \
  } while (0)

static void test_plan() {
  const int vecs[] = {8, 4, 2};
  std::vector<int64_t> vocab = {1, 2, 7, 8, 9, 1000, 2047, 2048, 16383, 16384, 16385, 32000,
                                32003, 50257, 128256, 151936, 152064, 201088, 262144};
  std::mt19937_64 rng(1);
  for (int i = 0; i < 300; ++i) vocab.push_back(1 + int64_t(rng() % 300000));
  for (int vec : vecs) {
    for (int64_t V : vocab) {
      const ChunkPlan p = plan_chunks(V, vec);
      const int64_t n_vecs = (V + vec - 1) / vec;
      CHECK(p.n_vecs == n_vecs, "V=%lld vec=%d", (long long)V, vec);
      CHECK(p.n_chunks >= 1 && p.vecs_per_chunk >= 1, "V=%lld", (long long)V);
      CHECK(int64_t(p.n_chunks) * p.vecs_per_chunk >= n_vecs, "chunks must cover the row");
      CHECK(int64_t(p.n_chunks - 1) * p.vecs_per_chunk < n_vecs, "last chunk empty V=%lld vec=%d",
            (long long)V, vec);
      CHECK(p.vecs_per_chunk <= kVectorsPerChunk, "chunk above 128 KiB");
      CHECK(p.threads % 32 == 0 && p.threads >= 32 && p.threads <= kMaxThreads, "threads %d",
            p.threads);
      CHECK(int64_t(p.threads) * kUnroll * kSteps >= p.vecs_per_chunk,
            "a chunk must fit one CTA pass");
      CHECK(int64_t(p.threads - 32) * kUnroll * kSteps < p.vecs_per_chunk || p.threads == 32,
            "no idle warp: V=%lld threads=%d", (long long)V, p.threads);
    }
  }
  // Batch invariance starts here: the plan is a function of (V, vec) only.
  const ChunkPlan a = plan_chunks(151936, 8), b = plan_chunks(151936, 8);
  CHECK(a.n_chunks == b.n_chunks && a.vecs_per_chunk == b.vecs_per_chunk, "deterministic plan");
  CHECK(a.n_chunks == 3 && a.vecs_per_chunk == 6331 && a.threads == 224,
        "Qwen bf16 plan: C=%d per=%d T=%d", a.n_chunks, a.vecs_per_chunk, a.threads);
}

static void test_walk() {
  std::mt19937_64 rng(2);
  for (int trial = 0; trial < 2000; ++trial) {
    const int64_t N = 1 + int64_t(rng() % 5000);
    const int C = 1 + int(rng() % 40);
    const int64_t n_inner = 1 + int64_t(rng() % (N + 3));
    const RowLayout layout{n_inner, int64_t(rng() % 1000000), int64_t(rng() % 1000)};
    const int64_t n_items = N * C;
    const int64_t grid = 1 + int64_t(rng() % std::min<int64_t>(n_items, 3000));
    const GridWalk w = make_grid_walk(grid, C, n_inner);
    const int64_t block = int64_t(rng() % grid);
    ItemCursor cur;
    cur.init(block, C, n_inner);
    int64_t steps = 0;
    for (int64_t item = block; item < n_items; item += grid, ++steps) {
      const int64_t row = item / C;
      CHECK(cur.row == row && cur.chunk == int(item % C), "walk: N=%lld C=%d grid=%lld item=%lld",
            (long long)N, C, (long long)grid, (long long)item);
      CHECK(cur.offset(layout) == layout.offset(row), "offset: row=%lld", (long long)row);
      if (g_failures) return;
      cur.advance(w, C, n_inner);
    }
    CHECK(cur.row >= N, "walk must end past the last row");
  }
}

// Partial state of elements [lo, hi) of a row of z, straight from docs/math.md §1, in double.
struct Partial {
  double m, s1, s2, t;
  int idx;
};

static Partial chunk_state(const std::vector<double>& z, int64_t lo, int64_t hi) {
  Partial p{-std::numeric_limits<double>::infinity(), 0, 0, 0, INT_MAX};
  for (int64_t j = lo; j < hi; ++j) p.m = max_nan(p.m, z[j]);
  for (int64_t j = lo; j < hi; ++j) {
    if (p.idx == INT_MAX && z[j] == p.m) p.idx = int(j);
    if (!(p.m > -std::numeric_limits<double>::infinity() && std::isfinite(p.m))) continue;
    const double d = std::max(z[j] - p.m, -1000.0);
    const double e = std::exp(d);
    p.s1 += e;
    p.s2 += e * e;
    p.t += e * d;
  }
  return p;
}

static void test_finalize() {
  std::mt19937_64 rng(3);
  std::normal_distribution<double> normal(0.0, 3.0);
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int trial = 0; trial < 400; ++trial) {
    const int64_t V = trial < 8 ? int64_t(1) << (trial + 10) : 1 + int64_t(rng() % 70000);
    const int vec = 8;
    const ChunkPlan plan = plan_chunks(V, vec);
    std::vector<double> z(V);
    for (auto& v : z) v = normal(rng);
    const int kind = trial % 8;
    if (kind == 1) {  // ties across a chunk boundary: the first index must win
      const int64_t j = std::min<int64_t>(V - 1, int64_t(plan.vecs_per_chunk) * vec - 1);
      z[j] = 50.0;
      z[V - 1] = 50.0;
    }
    if (kind == 2) {  // -inf entries, one whole chunk of -inf when there are several
      for (int64_t j = 0; j < V; j += 3) z[j] = -inf;
      if (plan.n_chunks > 1)
        for (int64_t j = 0; j < int64_t(plan.vecs_per_chunk) * vec; ++j) z[j] = -inf;
    }
    if (kind == 3) z[rng() % V] = nan;
    if (kind == 4) z[rng() % V] = inf;
    if (kind == 5)
      for (auto& v : z) v = -inf;
    if (kind == 6) {  // near one-hot, and shifted by a large constant
      for (auto& v : z) v += 1000.0;
      z[rng() % V] = 1040.0;
    }

    const int64_t C = plan.n_chunks;
    std::vector<double> wm(C), ws1(C), ws2(C), wt(C);
    std::vector<int32_t> widx(C);
    for (int64_t k = 0; k < C; ++k) {
      const int64_t lo = k * int64_t(plan.vecs_per_chunk) * vec;
      const int64_t hi = std::min<int64_t>(V, lo + int64_t(plan.vecs_per_chunk) * vec);
      const Partial p = chunk_state(z, lo, hi);
      wm[k] = p.m;
      ws1[k] = p.s1;
      ws2[k] = p.s2;
      wt[k] = p.t;
      widx[k] = p.idx;
    }
    const int64_t label = int64_t(rng() % V);
    // At 1 / tau = 1 the raw logits are z (the fp32 / fp64 path's partials: raw max, sums
    // relative to it).
    const ForwardTermRaw<double> term(1.0);
    const FinalRow<double> f = finalize_row(
        fold_row(term, wm.data(), ws1.data(), ws2.data(), wt.data(), widx.data(), C, 1, 0), term,
        z[label]);

    // One-pass reference over the whole row.
    const Partial all = chunk_state(z, 0, V);
    const bool valid = all.m > -inf && std::isfinite(all.m);
    if (!valid) {
      CHECK(std::isnan(f.stats.lse) && std::isnan(f.stats.logprob) && std::isnan(f.stats.entropy) &&
                std::isnan(f.stats.collision) && std::isnan(f.stats.lgp) &&
                std::isnan(f.stats.max_prob) && f.argmax == -1,
            "invalid row must be NaN / -1 (trial %d kind %d)", trial, kind);
      continue;
    }
    const double lse = all.m + std::log(all.s1);
    const double H = std::log(all.s1) - all.t / all.s1;
    const double Cc = all.s2 / (all.s1 * all.s1);
    auto close = [](double a, double b) {  // equal infinities (label on a -inf logit) are close
      return a == b || std::fabs(a - b) <= 1e-12 * (1 + std::fabs(b));
    };
    CHECK(close(f.stats.lse, lse), "lse %.17g vs %.17g (trial %d)", f.stats.lse, lse, trial);
    CHECK(close(f.stats.logprob, z[label] - lse), "logprob (trial %d)", trial);
    CHECK(close(f.stats.entropy, H), "entropy %.17g vs %.17g (trial %d)", f.stats.entropy, H, trial);
    CHECK(close(f.stats.collision, Cc), "collision (trial %d)", trial);
    CHECK(close(f.stats.max_prob, 1.0 / all.s1), "max_prob (trial %d)", trial);
    CHECK(f.argmax == all.idx, "argmax %lld vs %d (trial %d kind %d)", (long long)f.argmax,
          all.idx, trial, kind);
    CHECK(f.stats.lgp >= 0, "lgp >= 0");
  }
}


// A warp's xor-butterfly sum as the kernel's warp_sum leaves it in lane 0 (fixed order).
template <typename T>
static T butterfly_sum(std::vector<T> v) {
  for (size_t o = v.size() / 2; o > 0; o >>= 1) {
    std::vector<T> next(v.size());
    for (size_t l = 0; l < v.size(); ++l) next[l] = v[l] + v[l ^ o];
    v = next;
  }
  return v[0];
}

// token_stats_partial_kernel's item for one chunk of x (-inf past its end) with T threads, from
// the kernel's per-thread functions: the partial state it writes (m, s1, s2, t, first argmax),
// its raw max M, and whether every thread holding the max found it in its recorded step.
struct ChunkOut {
  float M, m;
  double s1, s2;  // the workspace's: the top thread's terms in fp64 (top_vector_sums)
  float t;
  int idx;
  bool found_ok;
};

template <typename Tag>
static ChunkOut emulate_chunk(const float* x, int n_elem, int T, float inv_tau) {
  using Tr = DTypeTraits<Tag>;
  const int n_vecs = (n_elem + Tr::kVec - 1) / Tr::kVec;
  const ForwardTerm<Tag> term(inv_tau);
  const float ninf = -std::numeric_limits<float>::infinity();
  auto elem = [&](int v, int j) {
    const int e = v * Tr::kVec + j;
    return v < n_vecs && e < n_elem ? x[e] : ninf;
  };
  std::vector<ThreadRun<float>> runs(T);
  for (int tid = 0; tid < T; ++tid) {
    ThreadRun<float> r = empty_run<float>();
    for (int s = 0; s < kSteps; ++s) {
      float sm = ninf;
      for (int u = 0; u < kUnroll; ++u)
        for (int j = 0; j < Tr::kVec; ++j) sm = max_nan(sm, elem(s * kUnroll * T + u * T + tid, j));
      run_step(r, sm, s, term);
      constexpr int kGroup = sum_group<Tag>();
      for (int i0 = 0; i0 < kUnroll * Tr::kVec; i0 += kGroup) {
        float xs[kGroup];
        for (int i = 0; i < kGroup; ++i)
          xs[i] = elem(s * kUnroll * T + (i0 + i) / Tr::kVec * T + tid, (i0 + i) % Tr::kVec);
        run_add(term, xs, r);
      }
    }
    runs[tid] = r;
  }
  ChunkOut out{runs[0].mx, 0, 0, 0, 0, INT_MAX, true};
  for (int tid = 1; tid < T; ++tid) out.M = max_nan(out.M, runs[tid].mx);
  out.m = term.scale(out.M);
  // Each thread rescaled to the chunk's reference, then the CTA's fixed-order sums: a butterfly
  // per warp, then one over the warps' lane-0 values (absent warps add 0).
  std::vector<float> t1(T), t2(T), tt(T), w1(kMaxWarps, 0.0f), w2(kMaxWarps, 0.0f),
      wt(kMaxWarps, 0.0f);
  for (int tid = 0; tid < T; ++tid) {
    ThreadRun<float> r = runs[tid];
    run_rescale(r, term.ref_of(out.m), term);
    t1[tid] = r.s1;
    t2[tid] = r.s2;
    tt[tid] = term.finish_t(r.t);
    if (r.mz == out.m) {  // search the recorded step only, as the kernel
      int found = INT_MAX;
      for (int u = 0; u < kUnroll && found == INT_MAX; ++u) {
        const int v = r.step * kUnroll * T + u * T + tid;
        if (v >= n_vecs) break;
        for (int j = 0; j < Tr::kVec && found == INT_MAX; ++j)
          if (v * Tr::kVec + j < n_elem && term.scale(elem(v, j)) == out.m) found = v * Tr::kVec + j;
      }
      out.found_ok = out.found_ok && (found != INT_MAX || out.m == -INFINITY);
      out.idx = std::min(out.idx, found);
    }
  }
  // The top thread: the first lane at the max of the first warp whose max is the chunk's; its
  // sums leave the fp32 ones, and its warp's lane l sums its vector l in fp64 (none when the
  // chunk is NaN).
  double top1 = 0.0, top2 = 0.0;
  for (int w = 0; w < T / 32; ++w) {
    float wmax = runs[32 * w].mx;
    for (int l = 1; l < 32; ++l) wmax = max_nan(wmax, runs[32 * w + l].mx);
    if (!(term.scale(wmax) == out.m)) continue;
    int tid_top = 32 * w;
    while (!(runs[tid_top].mz == out.m)) ++tid_top;
    ThreadRun<float> r = runs[tid_top];
    run_rescale(r, term.ref_of(out.m), term);
    std::vector<double> f1(32), f2(32);
    for (int l = 0; l < 32; ++l) {
      const int v = (l / kUnroll) * kUnroll * T + (l % kUnroll) * T + tid_top;
      float xs[Tr::kVec];
      for (int j = 0; j < Tr::kVec; ++j) xs[j] = elem(v, j);
      top_vector_sums(term, r, xs, f1[l], f2[l]);
    }
    top1 = butterfly_sum(f1);
    top2 = butterfly_sum(f2);
    t1[tid_top] = t2[tid_top] = 0.0f;
    break;
  }
  for (int w = 0; w < T / 32; ++w) {
    const auto lanes = [&](const std::vector<float>& v) {
      return std::vector<float>(v.begin() + 32 * w, v.begin() + 32 * (w + 1));
    };
    w1[w] = butterfly_sum(lanes(t1));
    w2[w] = butterfly_sum(lanes(t2));
    wt[w] = butterfly_sum(lanes(tt));
  }
  out.s1 = double(butterfly_sum(w1)) + top1;
  out.s2 = double(butterfly_sum(w2)) + top2;
  out.t = butterfly_sum(wt);
  return out;
}

// Emulates token_stats_partial_kernel's item for one chunk of n_vecs vectors of kVec values (x,
// -inf past the chunk) with T threads, calling the kernel's per-thread functions.
template <typename Tag>
static void check_forward_chunk(const std::vector<float>& x, int T, float inv_tau, int trial) {
  const int n_elem = int(x.size());
  const ForwardTerm<Tag> term(inv_tau);
  const ChunkOut c = emulate_chunk<Tag>(x.data(), n_elem, T, inv_tau);
  CHECK(c.found_ok, "a thread with the max found no match (trial %d)", trial);
  const float M = c.M;
  const double s1 = c.s1, s2 = c.s2, t = c.t;
  // Reference in double from the raw logits: the first index of the raw max, d = (x - xm) / tau
  // with the kernel's fp32 1 / tau (its rounding is the temperature's).
  float xm = -INFINITY;
  bool bad = false;
  int ref_idx = -1;
  for (int e = 0; e < n_elem; ++e) {
    if (std::isnan(x[e]) || x[e] == INFINITY) bad = true;
    if (ref_idx < 0 || x[e] > xm) ref_idx = e, xm = std::max(xm, x[e]);
  }
  if (bad) {
    CHECK(std::isnan(M) || M == INFINITY, "NaN / +inf must reach the chunk max (trial %d)", trial);
    return;
  }
  if (xm == -INFINITY) return;  // all -inf: finalize makes the row invalid
  double r1 = 0, r2 = 0, rt = 0;
  for (int e = 0; e < n_elem; ++e) {
    const double d = (double(x[e]) - double(xm)) * double(inv_tau);
    if (d == -INFINITY) continue;
    const double ex = std::exp(d);
    r1 += ex;
    r2 += ex * ex;
    rt += ex * d;
  }
  const double zm = double(xm) * double(inv_tau);
  CHECK(M == xm, "chunk max %.9g vs %.9g (trial %d)", double(M), double(xm), trial);
  // The chunk's sums are relative to term.chunk_ref(m) (fold_row's reference).
  const double lse = term.chunk_ref(c.m) + std::log(s1), rlse = zm + std::log(r1);
  const double H = std::log(s1) - t / s1, rH = std::log(r1) - rt / r1;
  const double Cc = s2 / (s1 * s1), rC = r2 / (r1 * r1);
  // 16-bit path: the base-2 exponent fma(x, fl(log2e / tau), -ref) has an absolute error of
  // ~|z| 2^-23 (the header's accuracy notes), so the tolerance grows with the chunk max.
  const double tol = 1e-5 + (std::is_same_v<Tag, F32> ? 0.0 : 8.0 * std::fabs(zm) * 0x1p-23);
  CHECK(std::fabs(lse - rlse) <= tol * (1 + std::fabs(rlse)), "lse %.9g vs %.9g (trial %d)", lse,
        rlse, trial);
  CHECK(std::fabs(H - rH) <= tol * (1 + std::fabs(rH)), "entropy %.9g vs %.9g (trial %d)", H, rH,
        trial);
  CHECK(std::fabs(Cc - rC) <= tol * rC, "collision %.9g vs %.9g (trial %d)", Cc, rC, trial);
  CHECK(c.idx == ref_idx, "argmax %d vs %d (trial %d)", c.idx, ref_idx, trial);
}

static float to_bf16(float f) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

static void test_forward_thread_math() {
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const float inf = std::numeric_limits<float>::infinity();
  for (int trial = 0; trial < 600; ++trial) {
    const int T = 32 * (1 + int(rng() % 4));
    const bool bf16 = trial % 2 == 0;
    const int cap = T * kUnroll * kSteps * (bf16 ? 8 : 4);  // one chunk's elements at most
    const int n = 1 + int(rng() % cap);
    const float inv_tau = (trial % 3 == 0) ? 1.0f : 1.0f / (0.3f + float(rng() % 100) / 50.0f);
    std::vector<float> x(n);
    for (auto& v : x) v = bf16 ? to_bf16(normal(rng)) : normal(rng);
    const int kind = (trial / 2) % 8;
    if (kind == 1) {  // ties: the same max in several places, the first must win
      for (int k = 0; k < 5; ++k) x[rng() % n] = 20.0f;
    }
    if (kind == 2) {  // -inf runs, including a whole first part of the chunk
      for (int e = 0; e < n; ++e)
        if (e < n / 2 || rng() % 3 == 0) x[e] = -inf;
    }
    if (kind == 3) x[n - 1 - int(rng() % std::min(n, 64))] = 30.0f;  // max in a late step
    if (kind == 4) x[rng() % n] = std::numeric_limits<float>::quiet_NaN();
    if (kind == 5) x[rng() % n] = inf;
    if (kind == 6)
      for (auto& v : x) v = -inf;
    if (kind == 7) {  // values that round to the same z after scaling, and a large offset
      for (auto& v : x) v = bf16 ? to_bf16(v + 500.0f) : v + 500.0f;
    }
    if (bf16) {
      check_forward_chunk<BF16>(x, T, inv_tau, trial);
    } else {
      check_forward_chunk<F32>(x, T, inv_tau, trial);
    }
    if (g_failures) return;
  }
}

// The backward of one row as token_stats_backward_kernel computes it (BackwardTerm<Tag>::grad per
// element, the label's entry from label_grad16 (16-bit) or label_grad (fp32), from the
// forward's own saved lse, entropy, collision, max_prob and argmax), with random upstream
// gradients, against float64 from the raw logits: dz_j = (p_j (A + B log p_j + C' p_j) + g_l
// [j = c]) / tau. Entries with p_j = 0 in float64 (-inf, masked) must be exactly 0; the others
// are bounded relative to their scale, (p_j (|A|_terms + |B log p_j| + |C'| p_j) + |g_l| [j = c])
// / tau (|A|_terms: the sum of A's terms' sizes, each rounded), times (1 + |L| + |log p_j|) 2^-24:
// the exponent's rounding moves p_j by ~|log p_j| 2^-24 relative in fp32, and the 16-bit form
// takes p_j = 2^(x c - fl(L log2 e)), whose rounding adds ~|L| 2^-24 (fp32 works relative to the
// max). Returns the largest error in units of that bound.
template <typename Tag>
static double check_backward_row(const char* name, const std::vector<float>& x, int64_t label,
                                 float inv_tau, const FinalRow<float>& got, int trial) {
  std::mt19937_64 rng(1000 + trial);  // its own stream: the forward rows stay those measured
  std::normal_distribution<float> unit(0.0f, 1.0f);
  const float g_l = unit(rng), g_H = unit(rng), g_C = unit(rng), g_L = unit(rng);
  const int64_t V = int64_t(x.size());
  const TokenStatsGradCoef<float> coef = token_stats_grad_coef(
      g_l, g_H, g_C, g_L, got.stats.entropy, got.stats.collision);
  const float x_max = x[got.argmax];
  const float log_s1 = float(-std::log(double(got.stats.max_prob)));  // as the kernel loads it
  // 16-bit rows from L (launch 1), unless L lies far out (far_lse: launch 2, relative to the max).
  const bool fast = DTypeTraits<Tag>::kPacked16 && !far_lse(got.stats.lse);
  const BackwardTerm<Tag> term(inv_tau, got.stats.lse, x_max, log_s1, coef);
  const BackwardTerm<F32> relative(inv_tau, got.stats.lse, x_max, log_s1, coef);
  const float x_c = x[label];
  const float dz_c = fast ? label_grad16(x_c, inv_tau, x_max, got.stats.max_prob, coef, g_l)
                          : label_grad(x_c, inv_tau, x_max, log_s1, coef, g_l);
  // float64 truth from the raw logits.
  double zm = -INFINITY;
  for (int64_t j = 0; j < V; ++j) zm = std::max(zm, double(x[j]) * inv_tau);
  double r1 = 0, r2 = 0;
  for (int64_t j = 0; j < V; ++j) {
    const double d = double(x[j]) * inv_tau - zm;
    r1 += std::exp(d);
    r2 += std::exp(2 * d);
  }
  double H = 0;
  for (int64_t j = 0; j < V; ++j) {
    const double lp = double(x[j]) * inv_tau - zm - std::log(r1);
    if (std::exp(lp) > 0) H -= std::exp(lp) * lp;
  }
  const double C = r2 / (r1 * r1);
  const double A = double(g_L) - g_l - g_H * H - 2 * g_C * C, B = -double(g_H), Cp = 2.0 * g_C;
  // A's terms, each rounded (H and C are the forward's fp32 outputs): the scale of its error.
  const double A_terms = std::fabs(g_L) + std::fabs(g_l) + std::fabs(g_H * H) + 2 * std::fabs(g_C * C);
  double worst = 0;
  for (int64_t j = 0; j < V; ++j) {
    const double lp = double(x[j]) * inv_tau - zm - std::log(r1);
    const double p = std::exp(lp);
    const double on = j == label ? 1.0 : 0.0;
    const double want = p > 0 ? (p * (A + B * lp + Cp * p) + g_l * on) * inv_tau : g_l * on * inv_tau;
    const double scale =
        (p > 0 ? p * (A_terms + std::fabs(B * lp) + std::fabs(Cp) * p) : 0.0) +
        std::fabs(g_l) * on;
    const float g = j == label ? dz_c : fast ? term.grad(x[j]) : relative.grad(x[j]);
    if (p == 0 && j != label) {
      CHECK(g == 0.0f, "%s backward: entry %lld of p = 0 is %.3g, not 0 (trial %d)", name,
            (long long)j, double(g), trial);
      continue;
    }
    const double unit_err =
        (1 + (fast ? std::fabs(double(got.stats.lse)) : 0.0) + std::fabs(lp)) * 0x1p-24;
    const double err = std::fabs(double(g) - want) / (scale * inv_tau * unit_err + 1e-30);
    CHECK(std::isfinite(g) && err <= 8.0,
          "%s backward: entry %lld %.9g vs %.9g, %.3g units (trial %d, V %lld)", name,
          (long long)j, double(g), want, err, trial, (long long)V);
    worst = std::max(worst, err);
  }
  return worst;
}

// Rows through the forward as the kernels run it: every chunk emulated (emulate_chunk, the
// kernel's thread layout and fp32 CTA sums; exp2 exact, as the header says), folded and finished
// as token_stats_finalize_kernel does (fold_row, then finalize_row_fast for 16-bit logits,
// finalize_row for fp32), against float64 from the raw logits (z = x inv_tau with the kernel's
// fp32 1 / tau: its rounding is the temperature's, not the kernel's). Rows: random, shifted (|z|
// up to ~800), peaked and near one-hot (the label often at the max), ties of the max across
// chunks, -inf runs, vocabulary masked with a huge finite fill (finfo.min, -1e30: whole threads
// and chunks of it, before the max too); 1 to 3 chunks (fp32: up to 5). Beside the kernel's error, the error of
// rounding z = x / tau alone (the rest exact), which plain fp32 PyTorch and every z - m method
// carry.
// A row's forward as the kernels run it: every chunk emulated (emulate_chunk), folded and
// finished as token_stats_finalize_kernel does.
template <typename Tag>
static FinalRow<float> forward_row(const std::vector<float>& x, float inv_tau, int64_t label) {
  using Tr = DTypeTraits<Tag>;
  const int64_t V = int64_t(x.size());
  const ChunkPlan plan = plan_chunks(V, Tr::kVec);
  const int64_t C = plan.n_chunks, per = int64_t(plan.vecs_per_chunk) * Tr::kVec;
  std::vector<float> wm(C), wt(C);
  std::vector<double> ws1(C), ws2(C);
  std::vector<int32_t> widx(C);
  for (int64_t k = 0; k < C; ++k) {
    const int64_t lo = k * per, n = std::min<int64_t>(V, lo + per) - lo;
    const ChunkOut c = emulate_chunk<Tag>(x.data() + lo, int(n), plan.threads, inv_tau);
    wm[k] = c.m;
    ws1[k] = c.s1;
    ws2[k] = c.s2;
    wt[k] = c.t;
    widx[k] = c.idx == INT_MAX ? INT_MAX : int32_t(lo + c.idx);
  }
  const ForwardTerm<Tag> term(inv_tau);
  const FoldedRow folded =
      fold_row(term, wm.data(), ws1.data(), ws2.data(), wt.data(), widx.data(), C, 1, 0);
  return finish_row(term, folded, [&](int64_t j) { return x[j]; }, V, label);
}

// max_prob's bound relative to the truth (test_rows measures it on every row).
constexpr double kMaxProbErr = 6e-7;

template <typename Tag>
static void test_rows(const char* name) {
  using Tr = DTypeTraits<Tag>;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const float ninf = -std::numeric_limits<float>::infinity();
  const auto round_in = [](float v) { return Tr::kPacked16 ? to_bf16(v) : v; };
  const float inv_taus[] = {1.0f, 1.0f / 0.7f, 1.0f / 0.05f, 0.5f};
  const float offsets[] = {0.0f, 20.0f, -15.0f, 40.0f};
  double worst[4] = {0, 0, 0, 0}, worst_z[4] = {0, 0, 0, 0};  // lse, logprob, H, lgp
  double worst_max_prob = 0;  // relative
  double worst_grad = 0;      // check_backward_row's error over its scale
  // The fills of kinds 5 and 6: the dtype's lowest finite value (Hugging Face's mask) and -1e30.
  const float lowest = Tr::kPacked16 ? -0x1.fep127f : -std::numeric_limits<float>::max();
  for (int trial = 0; trial < 384; ++trial) {
    const int64_t V = trial % 6 == 0 ? 1 + int64_t(rng() % 9) : 1 + int64_t(rng() % 140000);
    const float inv_tau = inv_taus[trial % 4];
    const float offset = offsets[(trial / 4) % 4];
    std::vector<float> x(V);
    for (auto& v : x) v = round_in(normal(rng) + offset);
    // Kinds 0-4 cycle through the first 240 trials, the masked kinds 5 and 6 through the next
    // 96, then a row masked whole (7), all -inf (8) and one NaN (9) through 16 each.
    const int kind = trial < 240 ? (trial / 16) % 5 : trial < 336 ? 5 + (trial / 16) % 2
                                                                   : 7 + (trial - 336) / 16;
    int64_t top = int64_t(rng() % V);
    if (kind == 1) x[top] = round_in(offset + 40.0f);  // near one-hot
    if (kind == 2) x[top] = round_in(offset + 16.0f);  // peaked
    if (kind == 3) {  // the max tied, the later copy in another chunk when there are several
      x[top] = round_in(offset + 30.0f);
      x[V - 1] = x[top];
      top = std::min<int64_t>(top, V - 1);
    }
    if (kind == 4)
      for (int64_t j = 0; j < V; ++j)
        if (j != top && rng() % 3 == 0) x[j] = ninf;
    int64_t label = (kind == 1 || kind == 2) && trial % 2 ? top : int64_t(rng() % V);
    if (kind == 5 || kind == 6) {
      // Masked but for a run of up to 4 logits (the label among them): in the middle (kind 5,
      // finfo.min) or at the end (kind 6, -1e30), so that whole threads and chunks hold only the
      // fill (before the max too). Each such thread's base-2 reference lies beyond kFarRef: its
      // rounding made 2^eps overflow (inf sums times a rescale factor of 0: NaN rows).
      const float fill = kind == 5 ? lowest : round_in(-1e30f);
      const int64_t run = std::min<int64_t>(V, 4), start = kind == 5 ? (V - run) / 2 : V - run;
      for (int64_t j = 0; j < V; ++j)
        if (j < start || j >= start + run) x[j] = fill;
      label = start + int64_t(rng() % run);
    }
    if (kind == 7) {  // masked whole: uniform over V (finished by exact_row, and launch 2)
      const float fill = trial % 2 ? lowest : round_in(-1e30f);
      for (auto& v : x) v = fill;
    }
    if (kind == 8)
      for (auto& v : x) v = ninf;
    if (kind == 9) x[rng() % V] = std::numeric_limits<float>::quiet_NaN();

    const FinalRow<float> got = forward_row<Tag>(x, inv_tau, label);
    if (kind >= 8) {  // all -inf, or a NaN: a NaN row (argmax -1)
      CHECK(std::isnan(got.stats.lse) && std::isnan(got.stats.logprob) &&
                std::isnan(got.stats.entropy) && std::isnan(got.stats.max_prob) && got.argmax == -1,
            "%s invalid row must be NaN / -1 (trial %d, kind %d)", name, trial, kind);
      continue;
    }

    // The truth from the raw logits, and the same from z = fl(x inv_tau) (zr).
    struct Row {
      double lse, logprob, H, lgp, max_prob;
    };
    const auto row_of = [&](auto z_of) {
      double zm = -INFINITY;
      for (int64_t j = 0; j < V; ++j) zm = std::max(zm, z_of(j));
      double r1 = 0, r2 = 0, rt = 0;
      for (int64_t j = 0; j < V; ++j) {
        const double d = z_of(j) - zm;
        if (d == -INFINITY) continue;
        r1 += std::exp(d);
        r2 += std::exp(2 * d);
        rt += std::exp(d) * d;
      }
      // log p_c relative to the max: z_c - lse cancels to ulp(zm), 2^47 at a -1e30 mask.
      const double lse = zm + std::log(r1), logprob = (z_of(label) - zm) - std::log(r1);
      const double Cc = r2 / (r1 * r1), p_c = std::exp(logprob);
      return Row{lse, logprob, std::log(r1) - rt / r1, (1 - p_c) * (1 - p_c) + (Cc - p_c * p_c),
                 1 / r1};
    };
    const Row truth = row_of([&](int64_t j) { return double(x[j]) * inv_tau; });
    const Row zr = row_of([&](int64_t j) { return double(x[j] * inv_tau); });
    int64_t first = 0;
    for (int64_t j = 1; j < V; ++j)
      if (x[j] > x[first]) first = j;
    CHECK(got.argmax == first, "%s argmax %lld vs %lld (trial %d)", name,
          (long long)got.argmax, (long long)first, trial);
    // max_prob = 1 / s1 relative to the max's term: off by s1's fp32 rounding, the thread that
    // holds the max adding each e to its own 1 at ulp(1) / 2 (fp32 adds them one by one: up to
    // 4.6e-7 relative on these rows; bf16 3.5e-7 in pairwise groups), until that thread was
    // summed in fp64 (top_vector_sums): 1.8e-7 / 2.0e-7, the other threads' sums. Plain fp32's
    // exp(z_m - lse) carries ulp(lse) / 2 relative: 1.9e-6 at lse ~ 40.
    const double max_prob_err = std::fabs(got.stats.max_prob - truth.max_prob) / truth.max_prob;
    CHECK(got.stats.max_prob <= 1.0f && max_prob_err <= kMaxProbErr,
          "%s max_prob %.9g vs %.9g (trial %d)", name, got.stats.max_prob, truth.max_prob, trial);
    worst_max_prob = std::max(worst_max_prob, max_prob_err);
    worst_grad = std::max(worst_grad, check_backward_row<Tag>(name, x, label, inv_tau, got, trial));
    // Error beyond the fp32 output's own rounding (half an ulp of the true value).
    const auto excess = [](double got_v, double truth_v) {
      const float a = float(std::fabs(truth_v));
      const double half_ulp = 0.5 * (double(std::nextafter(a, INFINITY)) - double(a));
      return std::max(0.0, std::fabs(got_v - truth_v) - half_ulp);
    };
    const double e[4] = {excess(got.stats.lse, truth.lse), excess(got.stats.logprob, truth.logprob),
                         excess(got.stats.entropy, truth.H), excess(got.stats.lgp, truth.lgp)};
    const double e_z[4] = {excess(zr.lse, truth.lse), excess(zr.logprob, truth.logprob),
                           excess(zr.H, truth.H), excess(zr.lgp, truth.lgp)};
    // Measured (these 336 rows), beyond the outputs' rounding: bf16 up to 7.2e-7 (entropy; lse
    // 1.3e-7, log p 3.4e-7, lgp 2.0e-7), from the fp32 sums (the per-thread chains of s2 and t,
    // and of s1 one add per pairwise sum of sum_group values); the z-units finish was up to 5e-5
    // off (|z| ~ 1000 at tau 0.05: the chunk's base-2 reference rounded). fp32, relative to the
    // raw max: lse 2.9e-7, log p 4.8e-7, entropy 4.8e-7, lgp 3.1e-7. With the top thread's sums
    // in fp64 (top_vector_sums, 2026-12-07): bf16 entropy 5.5e-7, lse 1.1e-7, log p 1.0e-7, lgp
    // 7.8e-8; fp32 lse 8.5e-8, log p 7.2e-8, entropy 2.4e-7, lgp 1.1e-7, where rounding z = x / tau
    // alone (the z - m form of the earlier fp32 kernel and of plain PyTorch) is off by 3.9e-5,
    // 1.0e-5 and 1.9e-5 in log p, entropy and lgp (|z| ~ 800).
    const char* names[4] = {"lse", "logprob", "entropy", "lgp"};
    // The entropy relative to its own size too: a near one-hot row's H (~1e-16 at V < 10) lies
    // far below the rounding of the max's own term in t (16-bit: e_m eps, ~1e-14), which must
    // not be taken for the other entries' mass (MaxTerm's rest; an H200 gave 2.3e-14 for a bf16
    // row's 2.4e-16). Within 2 H: dropped when below that rounding, kept to fp32 precision above.
    CHECK(std::fabs(got.stats.entropy - truth.H) <= 2 * truth.H,
          "%s entropy %.9g vs %.9g, beyond 2 H (trial %d, V %lld, kind %d)", name,
          got.stats.entropy, truth.H, trial, (long long)V, kind);
    for (int i = 0; i < 4; ++i)
      CHECK(e[i] <= 1e-6, "%s %s off by %.3g beyond its rounding (trial %d, V %lld, kind %d)",
            name, names[i], e[i], trial, (long long)V, kind);
    for (int i = 0; i < 4; ++i) {
      worst[i] = std::max(worst[i], e[i]);
      worst_z[i] = std::max(worst_z[i], e_z[i]);
    }
  }
  std::printf("test_rows<%s>: max error beyond the fp32 rounding, the kernel / z = x / tau "
              "rounded alone: lse %.3g / %.3g, logprob %.3g / %.3g, entropy %.3g / %.3g, "
              "lgp %.3g / %.3g; max_prob %.3g relative\n",
              name, worst[0], worst_z[0], worst[1], worst_z[1], worst[2], worst_z[2], worst[3],
              worst_z[3], worst_max_prob);
  std::printf("test_rows<%s>: backward, max error over (1 + |L| + |log p|) 2^-24 times each "
              "entry's scale: %.3g\n", name, worst_grad);
}

// 7. The label's entry of confident bf16 rows (label = argmax, 1 - p_c 1e-2 .. 1e-5, z_c 20-80),
// the upstream gradient on logprob alone: (1 - p_c) / tau, taken relative to the row max by
// label_grad16, is off by max_prob's own error at most (kMaxProbErr, and its fp32 rounding). From
// the saved L (label_grad_from_lse) it carried ulp(L) / 2: 3-12 % of the entry at z_c 20-80.
static void test_confident_label_entry() {
  std::mt19937_64 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  double worst = 0;
  for (float inv_tau : {1.0f, 1.0f / 0.7f}) {
    for (float top : {20.0f, 40.0f, 80.0f}) {
      for (int trial = 0; trial < 6; ++trial) {
        const int64_t V = 32000, c = int64_t(rng() % V);
        const float gap = 14.0f + float(rng() % 80) / 10.0f;
        std::vector<float> x(V);
        for (auto& v : x) v = to_bf16(top - gap + 0.5f * normal(rng));
        x[c] = to_bf16(top);
        const FinalRow<float> got = forward_row<BF16>(x, inv_tau, c);
        const TokenStatsGradCoef<float> coef =
            token_stats_grad_coef(1.0f, 0.0f, 0.0f, 0.0f, got.stats.entropy, got.stats.collision);
        const float g = label_grad16(x[c], inv_tau, x[got.argmax], got.stats.max_prob, coef, 1.0f);
        double r1 = 0;
        for (int64_t j = 0; j < V; ++j) r1 += std::exp((double(x[j]) - double(x[c])) * inv_tau);
        const double want = -std::expm1(-std::log(r1)) * inv_tau;  // (1 - p_c) / tau
        const double err = std::fabs(double(g) - want) / ((kMaxProbErr + 0x1p-24) * inv_tau);
        CHECK(err <= 1.0, "bf16 label entry %.9g vs %.9g (z_c %g, tau %g)", double(g), want,
              double(top * inv_tau), 1.0 / inv_tau);
        worst = std::max(worst, err);
      }
    }
  }
  std::printf("test_confident_label_entry: max error over (6e-7 + 2^-24) / tau: %.3g\n", worst);
}

// 8. bf16 rows far from 0 (L from -1e3 to -1e7, tau 1 and 0.1): the lse's gradient p_j / tau, by
// the path far_lse picks (launch 1 from L, or launch 2 relative to the max), within 2^-11 of p_j
// (fp16's half ulp is 2^-12 of it). Switching at the forward's 2^28 let launch 1 take rows at
// L = -1e6 22 bf16 half ulps off (0.32 relative at L = -1e7).
static void test_far_rows_backward() {
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  const int64_t V = 1000;
  double worst = 0;
  for (float inv_tau : {1.0f, 10.0f}) {
    for (float base : {-1e3f, -1e4f, -6.6e4f, -1e6f, -1e7f}) {
      std::vector<float> x(V);
      for (auto& v : x) v = to_bf16(base + normal(rng) * std::fabs(base) * 0x1p-12f);
      const FinalRow<float> got = forward_row<BF16>(x, inv_tau, 0);
      const TokenStatsGradCoef<float> coef =
          token_stats_grad_coef(0.0f, 0.0f, 0.0f, 1.0f, got.stats.entropy, got.stats.collision);
      const float x_max = x[got.argmax];
      const float log_s1 = float(-std::log(double(got.stats.max_prob)));
      const BackwardTerm<BF16> from_lse(inv_tau, got.stats.lse, x_max, log_s1, coef);
      const BackwardTerm<F32> relative(inv_tau, got.stats.lse, x_max, log_s1, coef);
      const bool far = far_lse(got.stats.lse);
      double r1 = 0;
      for (int64_t j = 0; j < V; ++j) r1 += std::exp((double(x[j]) - double(x_max)) * inv_tau);
      for (int64_t j = 1; j < V; ++j) {  // (j = 0: the label's entry)
        const double p = std::exp((double(x[j]) - double(x_max)) * inv_tau) / r1;
        const float g = far ? relative.grad(x[j]) : from_lse.grad(x[j]);
        const double err = std::fabs(double(g) / inv_tau - p) / (p * 0x1p-11 + 1e-38);
        CHECK(err <= 1.0, "bf16 row at %g, tau %g (L %g, far %d): p_j %.9g vs %.9g", double(base),
              1.0 / inv_tau, double(got.stats.lse), int(far), double(g) / inv_tau, p);
        worst = std::max(worst, err);
      }
    }
  }
  std::printf("test_far_rows_backward: max error of p_j over 2^-11 of it: %.3g\n", worst);
}

// 9. Peaked rows with runner-ups (randn * 2, 1-5 runner-ups 0-2 above the rest, the label 5-13
// above those: lgp 1e-10 .. 2e-2, 1 - p_c down to ~1e-6), bf16 and fp32, the runner-ups anywhere
// or right after the label (bf16: in its own vector, one thread's; fp32's 4-wide vectors hold 3
// of them, the rest in the next vector): lgp, entropy and log p absolute, against float64
// from the raw logits. The lgp is s2 - e_c^2 and the entropy and log p s1 - e_m: the rests the
// top thread's fp64 sums keep (top_vector_sums). With that thread summed in fp32 like the others
// (its chains and the CTA's butterflies adding to its e_m ~ 1 at ulp(1) / 2) the lgp was 1.0-2.4x
// plain fp32 PyTorch's mean error (~1e-8 .. 3e-8) and its worst up to 3.4x plain's (a numpy
// emulation of this kernel, bf16 / fp16 [64, 128] and [16, 4096], tau 1 and 0.7).
template <typename Tag>
static void test_peaked_rows(const char* name) {
  using Tr = DTypeTraits<Tag>;
  std::mt19937_64 rng(11);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  const auto round_in = [](float v) { return Tr::kPacked16 ? to_bf16(v) : v; };
  double worst[3] = {0, 0, 0};  // lgp, entropy, logprob
  for (int trial = 0; trial < 128; ++trial) {
    const bool beside = trial % 2;
    const float inv_tau = trial % 4 < 2 ? 1.0f : 1.0f / 0.7f;
    const int64_t V = trial < 64 ? 128 : 1024 + int64_t(rng() % 140000);
    std::vector<float> x(V);
    float top = -INFINITY;
    for (auto& v : x) top = std::max(top, v = normal(rng));
    const int64_t label = beside ? Tr::kVec * int64_t(rng() % (V / Tr::kVec)) : int64_t(rng() % V);
    const int k = 1 + int(rng() % 5);
    for (int i = 0; i < k; ++i) {
      const int64_t j = beside ? label + 1 + i : int64_t(rng() % V);
      if (j != label && j < V) x[j] = top + 2.0f * unit(rng);
    }
    x[label] = top + 5.0f + 8.0f * unit(rng);
    for (auto& v : x) v = round_in(v);
    const FinalRow<float> got = forward_row<Tag>(x, inv_tau, label);
    double r1 = 0, rest1 = 0, rest2 = 0, rt = 0;
    for (int64_t j = 0; j < V; ++j) {
      const double d = (double(x[j]) - double(x[label])) * inv_tau;  // the label is the max
      const double e = std::exp(d);
      r1 += e;
      rt += e * d;
      if (j != label) rest1 += e, rest2 += e * e;
    }
    const double lgp = (rest1 * rest1 + rest2) / (r1 * r1);
    const double H = std::log(r1) - rt / r1, logprob = -std::log1p(rest1);
    const double err[3] = {std::fabs(got.stats.lgp - lgp), std::fabs(got.stats.entropy - H),
                           std::fabs(got.stats.logprob - logprob)};
    // Bounds: 1e-9 absolute plus 2^-20 relative (the fp32 sums of the rest, over up to 1.4e5
    // terms in other threads).
    const double val[3] = {lgp, H, std::fabs(logprob)};
    const char* names[3] = {"lgp", "entropy", "logprob"};
    for (int i = 0; i < 3; ++i) {
      CHECK(err[i] <= 1e-9 + val[i] * 0x1p-20, "%s peaked row %s %.9g vs %.9g (trial %d, V %lld)",
            name, names[i], i == 0 ? double(got.stats.lgp) : i == 1 ? double(got.stats.entropy)
            : double(got.stats.logprob), i == 0 ? lgp : i == 1 ? H : logprob, trial, (long long)V);
      worst[i] = std::max(worst[i], err[i] / (1e-9 + val[i] * 0x1p-20));
    }
  }
  std::printf("test_peaked_rows<%s>: max error over its bound: lgp %.3g, entropy %.3g, logprob "
              "%.3g\n", name, worst[0], worst[1], worst[2]);
}

// 10. Confident rows (tests/test_token_stats.py's: 48 x 301, randn * 2, the label 8-22 + log V
// above the rest, 1 - p_c from ~1e-2 down to ~1e-10): entropy and log p within 1e-9 absolute, as
// on the other backends, where plain fp32 PyTorch is 100 % off.
template <typename Tag>
static void test_confident_rows(const char* name) {
  using Tr = DTypeTraits<Tag>;
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  const auto round_in = [](float v) { return Tr::kPacked16 ? to_bf16(v) : v; };
  const int64_t V = 301;
  double worst = 0;
  for (float inv_tau : {1.0f, 1.0f / 0.7f}) {
    for (int i = 0; i < 48; ++i) {
      std::vector<float> x(V);
      float top = -INFINITY;
      for (auto& v : x) top = std::max(top, v = round_in(normal(rng)));
      const int64_t label = int64_t(rng() % V);
      x[label] = round_in(top + 8.0f + 14.0f * float(i) / 47.0f + std::log(float(V)));
      const FinalRow<float> got = forward_row<Tag>(x, inv_tau, label);
      double r1 = 0, rest1 = 0, rt = 0;
      for (int64_t j = 0; j < V; ++j) {
        const double d = (double(x[j]) - double(x[label])) * inv_tau;
        const double e = std::exp(d);
        r1 += e;
        rt += e * d;
        if (j != label) rest1 += e;
      }
      const double H = std::log(r1) - rt / r1, logprob = -std::log1p(rest1);
      const double err = std::max(std::fabs(got.stats.entropy - H),
                                  std::fabs(got.stats.logprob - logprob));
      CHECK(err <= 1e-9, "%s confident row: entropy %.9g vs %.9g, log p %.9g vs %.9g (row %d)",
            name, double(got.stats.entropy), H, double(got.stats.logprob), logprob, i);
      worst = std::max(worst, err);
    }
  }
  // Rows more confident still (test_logit_gradient_proxy_far_below_ulp_1's: 9 x 4000, randn *
  // 0.5, the label a spike of 12-20 at tau 0.7): lgp 1e-7 .. 6e-18 within 1e-3 relative.
  std::normal_distribution<float> narrow(0.0f, 0.5f);
  double worst_lgp = 0;
  for (int i = 0; i < 9; ++i) {
    const int64_t V2 = 4000, label = 123;
    const float inv_tau = 1.0f / 0.7f;
    std::vector<float> x(V2);
    for (auto& v : x) v = narrow(rng);
    x[label] += 12.0f + float(i);
    for (auto& v : x) v = round_in(v);
    const FinalRow<float> got = forward_row<Tag>(x, inv_tau, label);
    double r1 = 0, rest1 = 0, rest2 = 0;
    for (int64_t j = 0; j < V2; ++j) {
      const double e = std::exp((double(x[j]) - double(x[label])) * inv_tau);
      r1 += e;
      if (j != label) rest1 += e, rest2 += e * e;
    }
    const double lgp = (rest1 * rest1 + rest2) / (r1 * r1);
    const double rel = std::fabs(got.stats.lgp - lgp) / lgp;
    CHECK(rel <= 1e-3, "%s lgp far below ulp(1): %.9g vs %.9g (row %d)", name,
          double(got.stats.lgp), lgp, i);
    worst_lgp = std::max(worst_lgp, rel);
  }
  std::printf("test_confident_rows<%s>: entropy and log p, max error %.3g (bound 1e-9); lgp of "
              "1e-7 .. 1e-17, relative %.3g (bound 1e-3)\n", name, worst, worst_lgp);
}

static void test_cached_count() {
  std::atomic<int> slot{0};
  int calls = 0;
  int answer = 0;  // what the query returns: < 1 = failed
  auto query = [&] {
    ++calls;
    return answer;
  };
  CHECK(cached_count(&slot, query) == 1 && calls == 1, "a failed query falls back to 1");
  CHECK(slot.load() == 0, "a failed query must not be cached");
  CHECK(cached_count(&slot, query) == 1 && calls == 2, "a failed query is asked again");
  answer = 4;
  CHECK(cached_count(&slot, query) == 4 && calls == 3, "a later success is used");
  answer = 7;
  CHECK(cached_count(&slot, query) == 4 && calls == 3, "a success is cached, not asked again");
  CHECK(cached_count(nullptr, query) == 7 && calls == 4, "no slot: asked every time");
  answer = -1;
  CHECK(cached_count(nullptr, query) == 1 && calls == 5, "no slot, failed: 1");
  // The real launchers' queries without a usable GPU: 1 (and not cached: the next call asks
  // again, which a machine with a GPU passes; here it just must not crash or throw).
  int n_devices = 0;
  if (cudaGetDeviceCount(&n_devices) != cudaSuccess || n_devices == 0) {
    (void)cudaGetLastError();
    constexpr auto k = token_stats_partial_kernel<F32, true>;
    CHECK(resident_ctas_per_sm<k>(0, 256) == 1, "no GPU: 1 CTA per SM");
    CHECK(resident_ctas_per_sm<k>(0, 256) == 1, "no GPU, asked again: 1 CTA per SM");
    CHECK(sm_count(0) == 1, "no GPU: 1 SM");
  }
}

int main() {
  test_plan();
  test_walk();
  test_finalize();
  test_forward_thread_math();
  test_rows<BF16>("bf16");
  test_rows<F32>("fp32");
  test_confident_label_entry();
  test_far_rows_backward();
  test_peaked_rows<BF16>("bf16");
  test_peaked_rows<F32>("fp32");
  test_confident_rows<BF16>("bf16");
  test_confident_rows<F32>("fp32");
  test_cached_count();
  std::printf("host_test: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
