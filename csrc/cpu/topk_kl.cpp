// topk_kl on the CPU: KL(q || p) coarse-grained to q's top-k ids plus one tail bucket
// (docs/math.md §4), with the derivation and edge cases in softmax_stats.h.
//
// Forward: one pass over each row. The row's K ids are sorted once (a private copy; this also
// finds duplicates), then per chunk (vec_rows.h): load + scale + max, overwrite the chunk's ids
// with -inf in the L1 buffer, and sum exp(z - m_tail) over what is left: the tail, relative to
// its own running max (rescaled when it rises). One exp per element. The K head logits are then
// taken from the chunk buffer and joined with the tail for the full normalizer L, so
// log P_tail needs no 1 - sum_K p_v (which cancels when the tail is tiny). The row's finish
// (normalizer, q's masses, the KL terms) runs in double for fp32 rows (row_sum_t; per row, so
// the loop's cost does not move): log s = log1p(rest), log P_tail = -log1p(head / tail) when
// the tail holds most of p, q_tail = -expm1(log q_max) - the other q's (q_masses), each output
// rounded once.
// Reads V logits + K ids + K log-probs, writes 4 numbers per row (kl; the row max m and
// log s = L - m; log P_tail).
// Backward: one pass; recomputes p_j = exp((z_j - m) - log s) relative to the saved row max, as
// token_stats does (not exp(z_j - L): a saved L carries ulp(L) / 2, 4.9e-4 at |z| ~ 1e4 under a
// small temperature, which becomes the relative error of every p_j; measured on a one-hot row
// at tau 0.07: a gradient entry 2.2e-3 where the truth is 0 and plain PyTorch's error 2.7e-7),
// from the saved m, log s, log P_tail and the K log-probs, writes the tail formula for every
// element of a chunk, overwrites the chunk's ids with the head formula (formed in double) in
// the buffer, and rounds to the logits' dtype (reads V, writes V). The tail factor comes from
// double coefficients, its offset rounded once. z = x / tau is rounded once
// (vec_rows.h's load_quotient_chunk), as PyTorch's and the reference's z, the same way in both
// passes, so z_j - m is exactly 0 at the row's max. x (1 / tau) rounds twice: on a row with
// |z| ~ 1e2..1e4 (per-row tau 0.05) that is up to 1.5 ulp(z) in every log p_v, 3.8x plain
// PyTorch's KL error.
// Rows are independent and each is computed by one thread in a fixed order, so results are
// deterministic and do not depend on the batch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "ops.h"
#include "vec_rows.h"

namespace pg_kernels::cpu {
namespace {

// (vocab id, position in the row's top-k list), sorted by id.
using IdSlot = std::pair<int64_t, int64_t>;

// Row r's ids, sorted by id. Ids are checked before any use: in [0, V) and distinct.
void sorted_row_ids(const LabelReader& ids, int64_t r, int64_t K, int64_t V,
                    std::vector<IdSlot>& out) {
  out.resize(K);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t id = ids(r * K + k);
    TORCH_CHECK(id >= 0 && id < V, "topk_kl: topk_ids row ", r, " position ", k, " = ", id,
                " is outside [0, ", V, ")");
    out[k] = {id, k};
  }
  std::sort(out.begin(), out.end());
  for (int64_t k = 1; k < K; ++k) {
    TORCH_CHECK(out[k].first != out[k - 1].first, "topk_kl: topk_ids row ", r, " holds id ",
                out[k].first, " twice; the top-k ids of a row must be distinct");
  }
}

template <typename acc_t>
acc_t buffer_max(const acc_t* buf, int64_t n_pad) {
  constexpr int64_t W = Vec<acc_t>::size();
  Vec<acc_t> vmax(neg_inf<acc_t>());
  for (int64_t i = 0; i < n_pad; i += W) vmax = at::vec::maximum(vmax, Vec<acc_t>::loadu(buf + i));
  return lanes_max(vmax);
}

// q's masses in row_sum_t (double for fp32 rows): sum_K q_v and q_tail = 1 - sum_K q_v
// (topk_q_tail). From fp32 q's, 1 - sum_K q_v is off by ~ulp(1) / 2 per term, and q_tail
// multiplies log q_tail - log P_tail, ~150 on a peaked row at a small temperature (fp32
// [2, 63], tau 0.072: a KL of 0.043 off by 1.05e-5, plain PyTorch 1.6e-6). 1 - sum_K q_v is
// taken as -expm1(log q_max) - the other q's: 1 - (a sum near 1) rounds at ulp(1) / 2 even in
// double, and log q_tail - log P_tail reaches ~1e3 (fp64 [1, 1282] at tau 0.135: q_tail
// 6.4e-17 against log P_tail = -973 read as 1.1e-16, a KL of 3.7e-5 off by 4.4e-14). Only
// against a tail with no finite logit (`tail_empty`), where any q_tail > 0 makes the KL +inf,
// is the bucket's existence a threshold: 1 - sum_K q_v <= 2 K eps(acc_t) (topk_tail_noise) is
// the log-probs' own rounding and leaves none, as when an engine's top-k covers the policy's
// whole support (the Triton kernels and the reference decide it alike; a sign test of the sum
// in fp32 had the three disagree on ~40 % of such fp32 rows). The sums run in sorted id
// order, as every loop over the head; q[k] = q_v of the k-th sorted id.
template <typename T>
struct QMasses {
  T head, tail;
};

template <typename acc_t>
QMasses<row_sum_t<acc_t>> q_masses(const acc_t* log_q, const IdSlot* ids, int64_t K,
                                   bool has_tail, bool tail_empty, row_sum_t<acc_t>* q) {
  using fin_t = row_sum_t<acc_t>;
  int64_t i_max = 0;  // the first largest log-prob (the first entry when one is NaN there)
  for (int64_t k = 1; k < K; ++k) {
    if (log_q[ids[k].second] > log_q[ids[i_max].second]) i_max = k;
  }
  const fin_t lq_max = log_q[ids[i_max].second];
  fin_t head = 0, rest = -std::expm1(lq_max);
  for (int64_t k = 0; k < K; ++k) {
    q[k] = std::exp(fin_t(log_q[ids[k].second]));
    head += q[k];
    if (k != i_max) rest -= q[k];
  }
  if (tail_empty && has_tail) {  // only q_tail > 0 matters here: 1 - sum, as the truth takes it
    rest = fin_t(1) - head;
    has_tail = rest > fin_t(topk_tail_noise<acc_t>(K));
  }
  return {head, topk_q_tail(rest, has_tail)};
}

template <typename acc_t>
struct TopkKLRow {
  acc_t kl, m, log_s, logp_tail;  // L = m + log_s
};

// The tail's sum relative to its own running max (ids masked out of the chunk buffer), rescaled
// when the max rises. Two-level sums as in token_stats.cpp: two chains per lane inside a chunk,
// then chunk totals into the row's lanes, all in WideLanes (double lanes for fp32 rows): fp32
// lanes put ~1e-6 into the tail sum of a row of 4096 tied logits (an id's gradient entry 1.0e-6
// off relative to p_j where plain PyTorch's logsumexp was 2e-8 off).
template <typename acc_t>
struct TailSum {
  WideLanes<acc_t> s;
  acc_t m = neg_inf<acc_t>();

  // One chunk's buffer (z, the ids already -inf) of padded size n_pad and max chunk_max.
  void add_chunk(const acc_t* buf, int64_t n_pad, acc_t chunk_max) {
    constexpr int64_t W = Vec<acc_t>::size();
    if (chunk_max > m) {
      if (m != neg_inf<acc_t>()) s.scale(std::exp(row_sum_t<acc_t>(m) - row_sum_t<acc_t>(chunk_max)));
      m = chunk_max;
    }
    if (m == neg_inf<acc_t>()) return;  // nothing finite in the tail so far
    const Vec<acc_t> vm(m);
    WideLanes<acc_t> lo, hi;
    for (int64_t i = 0; i < n_pad; i += 2 * W) {
      // exp(-inf - m) = 0: masked ids, -inf logits and the padding add nothing.
      lo.add(vexp(Vec<acc_t>::loadu(buf + i) - vm));
      hi.add(vexp(Vec<acc_t>::loadu(buf + i + W) - vm));
    }
    s = s + (lo + hi);
  }
};

// The chunk's ids (sorted, from `next` on) overwritten with -inf in the buffer, their z kept in
// zh; returns the chunk's max over what is left (chunk_max if no id is in the chunk).
template <typename acc_t>
acc_t mask_ids(acc_t* buf, int64_t begin, int64_t n, const IdSlot* ids, int64_t K, int64_t& next,
               acc_t* zh, acc_t chunk_max) {
  bool masked = false;
  for (; next < K && ids[next].first < begin + n; ++next) {
    zh[next] = buf[ids[next].first - begin];
    buf[ids[next].first - begin] = neg_inf<acc_t>();
    masked = true;
  }
  return masked ? buffer_max(buf, round_up(n, kStep<acc_t>)) : chunk_max;
}

// The head's z are read from the chunk buffer (z = x / tau, the buffer's), not recomputed from
// x[id]: a recomputed x (1 / tau) - m contracts into an fma, whose exact product leaves
// z - m = ulp(z) / 2 at the max instead of 0 (4.9e-4 at |z| ~ 1e4), and the KL of one-hot
// p = q came out 1.9e-8 where the truth is 1e-24.
template <typename scalar_t, typename acc_t>
TopkKLRow<acc_t> forward_row(const scalar_t* x, int64_t V, Temperature<acc_t> tau,
                             const IdSlot* ids, int64_t K, const acc_t* log_q, acc_t* buf,
                             acc_t* zh, row_sum_t<acc_t>* q_head) {
  using fin_t = row_sum_t<acc_t>;
  TailSum<acc_t> tail;
  acc_t m_row = neg_inf<acc_t>();  // running max over everything: NaN / +inf detection
  int64_t next = 0;                // first sorted id not yet reached
  for (int64_t begin = 0; begin < V; begin += kChunk) {
    const int64_t n = std::min(kChunk, V - begin);
    const acc_t chunk_max = load_quotient_chunk(x + begin, n, tau.tau, tau.r, buf);
    m_row = max_nan(m_row, chunk_max);
    if (!(m_row < -neg_inf<acc_t>())) break;  // NaN or +inf anywhere: the row is NaN
    tail.add_chunk(buf, round_up(n, kStep<acc_t>),
                   mask_ids(buf, begin, n, ids, K, next, zh, chunk_max));
  }
  const acc_t m_tail = tail.m;
  if (!(m_row > neg_inf<acc_t>() && m_row < -neg_inf<acc_t>())) {
    const acc_t nan = quiet_nan<acc_t>();
    return {nan, nan, nan, nan};
  }
  // The finish, per row, in row_sum_t (double): the head's z are fp32 numbers (exact in
  // double), so only exp, log1p and the sums round, each at ~1e-16.
  const acc_t m_head = *std::max_element(zh, zh + K);
  fin_t head_rest = 0;  // the head's sum relative to its max, without one entry at the max
  if (m_head != neg_inf<acc_t>()) {
    bool skipped = false;
    for (int64_t k = 0; k < K; ++k) {
      if (!skipped && zh[k] == m_head) {
        skipped = true;
        continue;
      }
      head_rest += std::exp(fin_t(zh[k]) - fin_t(m_head));
    }
  }
  const fin_t tail_sum = tail.s.total();
  const TopkNormalizer<fin_t> norm = topk_normalizer<fin_t>(m_tail, tail_sum, m_head, head_rest);
  const QMasses<fin_t> q =
      q_masses(log_q, ids, K, K < V, m_tail == neg_inf<acc_t>(), q_head);
  // Head terms in a fixed order (sorted by id); q_v from the given log-probs.
  fin_t kl = 0;
  for (int64_t k = 0; k < K; ++k) {
    kl += kl_term(q_head[k], fin_t(log_q[ids[k].second]), (fin_t(zh[k]) - norm.m) - norm.log_s);
  }
  kl += kl_term(q.tail, std::log(q.tail), norm.logp_tail);
  return {acc_t(kl), acc_t(norm.m), acc_t(norm.log_s), acc_t(norm.logp_tail)};
}

template <typename scalar_t, typename acc_t>
void backward_row(const scalar_t* x, int64_t V, Temperature<acc_t> tau, const IdSlot* ids,
                  int64_t K, const acc_t* log_q, acc_t m, acc_t log_s, acc_t logp_tail, acc_t g,
                  acc_t* buf, acc_t* zh, row_sum_t<acc_t>* q_head, scalar_t* grad) {
  using fin_t = row_sum_t<acc_t>;
  constexpr int64_t W = Vec<acc_t>::size();
  // The row's coefficients in row_sum_t (double), as the forward's finish: q's masses (the
  // forward's), then the tail factor; the offset below is rounded once.
  const QMasses<fin_t> q =
      q_masses(log_q, ids, K, K < V, logp_tail == neg_inf<acc_t>(), q_head);
  const TopkKLGradCoef<fin_t> coef = topk_kl_grad_coef<fin_t>(q.head, q.tail, logp_tail);
  const acc_t g_tau = g / tau.tau;
  const fin_t g_tau_fin = fin_t(g) / fin_t(tau.tau);
  // Off the ids: dKL/dz_j = sign exp((z_j - m) - (log s - tail_log)); an offset of +inf
  // gives 0. Its two large terms cancel where q_tail / P_tail is large (tail_log ~ -log P_tail):
  // each carries ulp of its size, and a tail masked with -1e30 (log P_tail = -6e28 at tau 16.7)
  // gave a gradient entry of -0.06 where the truth is -8.6e-10. Beyond kFarTailLog the tail's
  // term is taken from its own softmax instead, Q p_j - q_tail t_j with t_j = exp(z_j - m_t) /
  // s_t (TailSum again: one more sweep over the row, for such rows only).
  constexpr double kFarTailLog = 32.0;
  const bool far = coef.tail_sign != fin_t(0) && !(std::abs(coef.tail_log) < kFarTailLog);
  TailSum<acc_t> tail;
  if (far) {
    for (int64_t begin = 0, nx = 0; begin < V; begin += kChunk) {
      const int64_t n = std::min(kChunk, V - begin);
      const acc_t chunk_max = load_quotient_chunk(x + begin, n, tau.tau, tau.r, buf);
      tail.add_chunk(buf, round_up(n, kStep<acc_t>),
                     mask_ids(buf, begin, n, ids, K, nx, zh, chunk_max));
    }
  }
  const Vec<acc_t> v_m(m), v_ls(log_s), v_off(acc_t(fin_t(log_s) - coef.tail_log)),
      v_scale(acc_t(coef.tail_sign) * g_tau), v_head(acc_t(coef.head * g_tau_fin)),
      v_mt(tail.m), v_lt(acc_t(std::log(tail.s.total()))), v_qt(acc_t(q.tail * g_tau_fin));
  int64_t next = 0;
  for (int64_t begin = 0; begin < V; begin += kChunk) {
    const int64_t n = std::min(kChunk, V - begin);
    load_quotient_chunk(x + begin, n, tau.tau, tau.r, buf);
    // The chunk's head z, as the forward read them, before the tail formula overwrites them.
    for (int64_t j = next; j < K && ids[j].first < begin + n; ++j) zh[j] = buf[ids[j].first - begin];
    if (far) {
      for (int64_t i = 0; i < n; i += W) {
        const Vec<acc_t> z = Vec<acc_t>::loadu(buf + i);
        const Vec<acc_t> p = vexp((z - v_m) - v_ls), t = vexp((z - v_mt) - v_lt);
        (p * v_head - t * v_qt).store(buf + i);
      }
    } else {
      for (int64_t i = 0; i < n; i += W) {
        (vexp((Vec<acc_t>::loadu(buf + i) - v_m) - v_off) * v_scale).store(buf + i);
      }
    }
    // On the ids: dKL/dz_j = Q p_j - q_j, in row_sum_t (K entries per row): on a peaked row
    // Q p_j and q_j are both near 1, and from fp32 exps the difference carried ulp(1) / 2 of
    // each (fp32 [1, 127] at |z| ~ 3300: the max's entry 4.3490e-5 where the truth is
    // 4.3289e-5). p_j relative to the saved row max, from the z the chunk held (exact in
    // double).
    for (; next < K && ids[next].first < begin + n; ++next) {
      const int64_t id = ids[next].first;
      const fin_t p = std::exp((fin_t(zh[next]) - fin_t(m)) - fin_t(log_s));
      buf[id - begin] = acc_t((coef.head * p - q_head[next]) * g_tau_fin);
    }
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::copy(buf, buf + n, grad + begin);
    } else {
      at::vec::convert(buf, grad + begin, n);
    }
  }
}

void check_topk_inputs(const char* op, const at::Tensor& logits, const at::Tensor& topk_ids,
                       const at::Tensor& topk_logprobs, const std::optional<at::Tensor>& labels,
                       const std::optional<at::Tensor>& temperature) {
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.is_contiguous() && topk_ids.size(1) >= 1, op,
              ": topk_ids must be a contiguous [N, K] tensor with K >= 1");
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong || topk_ids.scalar_type() == at::kInt, op,
              ": topk_ids must be int64 or int32, got ", topk_ids.scalar_type());
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(topk_logprobs.sizes() == topk_ids.sizes() && topk_logprobs.is_contiguous() &&
                  topk_logprobs.scalar_type() == acc,
              op, ": topk_logprobs must be a contiguous ", acc, " tensor shaped like topk_ids");
  check_rows(op, logits, topk_ids.size(0), temperature);
  if (labels) {
    TORCH_CHECK(labels->dim() == 1 && labels->is_contiguous() &&
                    labels->numel() == topk_ids.size(0) && labels->device().is_cpu() &&
                    (labels->scalar_type() == at::kLong || labels->scalar_type() == at::kInt),
                op, ": labels must be a flat contiguous int64 or int32 tensor of ",
                topk_ids.size(0), " elements");
  }
}

}  // namespace

std::vector<at::Tensor> topk_kl_forward(const at::Tensor& logits, const at::Tensor& topk_ids,
                                        const at::Tensor& topk_logprobs,
                                        const std::optional<at::Tensor>& labels,
                                        const std::optional<at::Tensor>& temperature,
                                        double temperature_scalar, int64_t ignore_index,
                                        int64_t n_inner, int64_t stride_outer,
                                        int64_t stride_inner) {
  check_topk_inputs("topk_kl", logits, topk_ids, topk_logprobs, labels, temperature);
  const int64_t N = topk_ids.size(0), K = topk_ids.size(1), V = logits.size(-1);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits.options().dtype(acc_dtype);
  at::Tensor kl = at::empty({N}, opts), row_max = at::empty({N}, opts),
             log_s = at::empty({N}, opts), logp_tail = at::empty({N}, opts);
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_kl_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const RowTemperature<acc_t> tau{temperature ? temperature->const_data_ptr<acc_t>() : nullptr,
                                    acc_t(temperature_scalar)};
    const acc_t* log_q = topk_logprobs.const_data_ptr<acc_t>();
    acc_t *o_kl = kl.data_ptr<acc_t>(), *o_m = row_max.data_ptr<acc_t>(),
          *o_ls = log_s.data_ptr<acc_t>(), *o_tail = logp_tail.data_ptr<acc_t>();
    const LabelReader read_ids(topk_ids);
    const std::optional<LabelReader> read_label =
        labels ? std::optional<LabelReader>(LabelReader(*labels)) : std::nullopt;
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kBufferSize<acc_t>];
      std::vector<IdSlot> ids;
      std::vector<acc_t> zh(K);
      std::vector<row_sum_t<acc_t>> q_head(K);
      for (int64_t r = begin; r < end; ++r) {
        if (read_label && (*read_label)(r) == ignore_index) {
          o_kl[r] = o_m[r] = o_ls[r] = o_tail[r] = acc_t(0);
          continue;
        }
        sorted_row_ids(read_ids, r, K, V, ids);
        const TopkKLRow<acc_t> row =
            forward_row(x + layout.offset(r), V, tau(r), ids.data(), K, log_q + r * K, buf,
                        zh.data(), q_head.data());
        o_kl[r] = row.kl;
        o_m[r] = row.m;
        o_ls[r] = row.log_s;
        o_tail[r] = row.logp_tail;
      }
    });
  });
  return {kl, row_max, log_s, logp_tail};
}

at::Tensor topk_kl_backward(const at::Tensor& grad_kl, const at::Tensor& logits,
                            const at::Tensor& topk_ids, const at::Tensor& topk_logprobs,
                            const std::optional<at::Tensor>& labels,
                            const std::optional<at::Tensor>& temperature,
                            double temperature_scalar, int64_t ignore_index,
                            const at::Tensor& row_max, const at::Tensor& log_s,
                            const at::Tensor& logp_tail, int64_t n_inner,
                            int64_t stride_outer, int64_t stride_inner) {
  check_topk_inputs("topk_kl_backward", logits, topk_ids, topk_logprobs, labels, temperature);
  const int64_t N = topk_ids.size(0), K = topk_ids.size(1), V = logits.size(-1);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&grad_kl, &row_max, &log_s, &logp_tail}) {
    TORCH_CHECK(t->dim() == 1 && t->numel() == N && t->is_contiguous() &&
                    t->scalar_type() == acc_dtype,
                "topk_kl_backward: per-row tensors must be contiguous ", acc_dtype, " [", N, "]");
  }
  at::Tensor grad = fresh_gradient(logits);  // contiguous: row r starts at r * V
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_kl_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const RowTemperature<acc_t> tau{temperature ? temperature->const_data_ptr<acc_t>() : nullptr,
                                    acc_t(temperature_scalar)};
    const acc_t *log_q = topk_logprobs.const_data_ptr<acc_t>(), *g_kl = grad_kl.const_data_ptr<acc_t>(),
                *s_m = row_max.const_data_ptr<acc_t>(), *s_ls = log_s.const_data_ptr<acc_t>(),
                *s_tail = logp_tail.const_data_ptr<acc_t>();
    const LabelReader read_ids(topk_ids);
    const std::optional<LabelReader> read_label =
        labels ? std::optional<LabelReader>(LabelReader(*labels)) : std::nullopt;
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kBufferSize<acc_t>];
      std::vector<IdSlot> ids;
      std::vector<acc_t> zh(K);
      std::vector<row_sum_t<acc_t>> q_head(K);
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* grad_row = g + r * V;
        const bool ignored = read_label && (*read_label)(r) == ignore_index;
        const bool nan_row = !(is_finite(s_m[r]) && is_finite(s_ls[r]));
        if (fill_skipped_row(grad_row, V, ignored, nan_row)) continue;
        sorted_row_ids(read_ids, r, K, V, ids);
        backward_row(x + layout.offset(r), V, tau(r), ids.data(), K, log_q + r * K, s_m[r],
                     s_ls[r], s_tail[r], g_kl[r], buf, zh.data(), q_head.data(), grad_row);
      }
    });
  });
  return grad;
}

}  // namespace pg_kernels::cpu
