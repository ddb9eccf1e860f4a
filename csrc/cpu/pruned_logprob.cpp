// pruned_logprob on the CPU: the log-prob of the label on the safe vocabulary
// S = {v : z_v >= m + log alpha} plus the label (docs/math.md §6); math in softmax_stats.h.
//
// Forward: two sweeps over each row, one exp per element in all.
//   1. max only: load + max of the raw logits per chunk (no exp, no division; x / tau rounded is
//      monotone in x, so the max of z is m / tau). The threshold m / tau + log alpha is then
//      fixed before anything is summed.
//   2. one exp per element, e = exp(d) with d = (x - m) / tau relative to the raw max (the
//      difference and the quotient rounded once each, as token_stats.cpp: d carries ulp(d) / 2
//      where z - m from z = x / tau carried ulp(z) / 2, a tail mass 8.1e-5 off at |z| ~ 1850
//      where plain PyTorch's was 2.4e-5, a fuzzer find), added to s_in where z >= threshold and
//      to s_out elsewhere (a blend, no branch), with the label masked out of the chunk buffer
//      (it is added back as e_c). Membership is decided on the raw logits, x >= x_thr with x_thr
//      the smallest x whose z reaches the threshold (raw_threshold), bit for bit as the backward
//      decides it. No rescaling is needed: the max is known.
// Why not one online pass: S depends on the final max, and when the running max rises, elements
// already summed into S that fall below the new threshold would have to leave the sum. A per-lane
// or per-chunk partial sum no longer knows which elements it holds, so removing them exactly means
// revisiting them anyway. The max sweep costs a fraction of the exp sweep on this CPU (no exp;
// ~4 ms vs ~14 ms for one exp pass over [1024, 32000] fp32), and the row is read again from
// cache: a bf16 row of 151936 logits (304 KB) stays in the 512 KB L2 of a core, an fp32 one
// (608 KB) comes back from L3.
// Reads V logits twice (once from cache for rows <= L2), writes 6 numbers per row.
// Backward: one pass; p~_j = exp(d_j - LSE_S) on S (the same d and membership test as the
// forward, from the saved raw max, LSE_S relative to it and threshold), 0 off S, then the
// label's entry 1 - p~_c; reads V, writes V. LSE_S is saved relative to the raw max, not in z
// units: m / tau + log s_S rounds to ulp(m / tau) / 2 (1.6e-5 of the gradient at |z| ~ 440, a
// fuzzer find; all of log s_S for a row masked whole with -1e30, whose gradient read 1 for 1 / V).
// Rows are independent and each is computed by one thread in a fixed order, so results are
// deterministic and do not depend on the batch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "ops.h"
#include "vec_rows.h"

namespace pg_kernels::cpu {
namespace {

template <typename acc_t>
struct SafeSums {
  Vec<acc_t> in{acc_t(0)}, out{acc_t(0)};

  // x: raw logits (-inf: masked, the label, the padding), d = (x - m) / tau, x_thr: the raw
  // threshold (raw_threshold).
  void add(const Vec<acc_t>& x, const Vec<acc_t>& d, const Vec<acc_t>& x_thr) {
    const Vec<acc_t> e = vexp(d);  // exp(-inf) = 0
    const Vec<acc_t> zero(acc_t(0));
    const Vec<acc_t> safe = x >= x_thr;
    in = in + Vec<acc_t>::blendv(zero, e, safe);
    out = out + Vec<acc_t>::blendv(e, zero, safe);
  }
};

// The smallest x whose z = x / tau (rounded, tau.divide) is >= t: the safe set decided on raw
// logits, x >= x_thr, exactly as z >= t (quotient_rn is monotone in x). From fl(t tau), an ulp
// or two away.
template <typename acc_t>
acc_t raw_threshold(acc_t t, const Temperature<acc_t>& tau) {
  acc_t x = tau.tau == acc_t(1) ? t : t * tau.tau;
  if (!(std::fabs(x) < -neg_inf<acc_t>())) return x;  // -inf (every entry is safe) or NaN
  for (int i = 0; i < 64 && tau.divide(x) < t; ++i) x = std::nextafter(x, -neg_inf<acc_t>());
  for (int i = 0; i < 64; ++i) {
    const acc_t below = std::nextafter(x, neg_inf<acc_t>());
    if (!(tau.divide(below) >= t)) break;
    x = below;
  }
  return x;
}

// The exponents of a row relative to its raw max m: d = (x - m) / tau, the difference and the
// quotient rounded once each, the same in both passes.
template <typename acc_t>
struct RawFrame {
  acc_t m;
  Temperature<acc_t> tau;

  Vec<acc_t> d(const Vec<acc_t>& x) const {
    const Vec<acc_t> diff = x - Vec<acc_t>(m);
    return tau.tau == acc_t(1) ? diff : vquotient(diff, Vec<acc_t>(tau.tau), Vec<acc_t>(tau.r));
  }
  // The label's d from the raw logits in double, rounded once (as token_stats.cpp's finalize):
  // a label far below the max has |x_c - m| > |x_c|, and fl(fl(x_c - m) / tau) carried
  // ~2 ulp(d_c), 2.3x the error of plain fp32's z_c - m there (|d_c| ~ 1e4). At V = 1 it is
  // exactly 0 (e_c = 1, the log-prob and its gradient 0).
  acc_t d_label(acc_t x_c) const {
    return acc_t((double(x_c) - double(m)) / double(tau.tau));
  }
};

template <typename scalar_t, typename acc_t>
PrunedRow<acc_t> forward_row(const scalar_t* x, int64_t V, Temperature<acc_t> tau, acc_t log_alpha,
                             int64_t label, acc_t* buf, acc_t& threshold, acc_t& row_max) {
  constexpr int64_t W = Vec<acc_t>::size();
  acc_t m = neg_inf<acc_t>();  // the raw max
  for (int64_t begin = 0; begin < V && m < -neg_inf<acc_t>(); begin += kChunk) {
    const int64_t n = std::min(kChunk, V - begin);
    m = max_nan(m, load_chunk(x + begin, n, buf));
  }
  row_max = m;
  threshold = tau.divide(m) + log_alpha;  // z units: m / tau is the max of z
  if (!(m > neg_inf<acc_t>() && m < -neg_inf<acc_t>())) {  // NaN, +inf or all -inf
    threshold = quiet_nan<acc_t>();
    return finalize_pruned(m, threshold, acc_t(0), acc_t(0), m);
  }
  const acc_t x_thr = raw_threshold(threshold, tau);
  const RawFrame<acc_t> frame{m, tau};
  // Two-level sums as in token_stats.cpp: two chains per lane inside a chunk, then chunk
  // totals into the row's lanes.
  SafeSums<acc_t> row;
  const Vec<acc_t> vx(x_thr);
  for (int64_t begin = 0; begin < V; begin += kChunk) {
    const int64_t n = std::min(kChunk, V - begin);
    const int64_t n_pad = copy_padded(x + begin, n, buf);
    if (label >= begin && label < begin + n) buf[label - begin] = neg_inf<acc_t>();
    SafeSums<acc_t> lo, hi;
    for (int64_t i = 0; i < n_pad; i += 2 * W) {
      const Vec<acc_t> a = Vec<acc_t>::loadu(buf + i), b = Vec<acc_t>::loadu(buf + i + W);
      lo.add(a, frame.d(a), vx);
      hi.add(b, frame.d(b), vx);
    }
    row.in = row.in + (lo.in + hi.in);
    row.out = row.out + (lo.out + hi.out);
  }
  // Relative to the raw max (finalize_pruned at m = 0, the label's d and the threshold's log
  // alpha): LSE_S is saved so, the backward's frame.
  PrunedRow<acc_t> out = finalize_pruned(acc_t(0), log_alpha, sum_lanes(row.in),
                                         sum_lanes(row.out), frame.d_label(acc_t(x[label])));
  out.in_safe = acc_t(x[label]) >= x_thr;
  return out;
}

// lse_safe relative to the raw max row_max, threshold in z units (forward_row).
template <typename scalar_t, typename acc_t>
void backward_row(const scalar_t* x, int64_t V, Temperature<acc_t> tau, int64_t label,
                  acc_t row_max, acc_t lse_safe, acc_t threshold, acc_t g, acc_t* buf,
                  scalar_t* grad) {
  constexpr int64_t W = Vec<acc_t>::size();
  const acc_t g_tau = g / tau.tau;
  const RawFrame<acc_t> frame{row_max, tau};
  const Vec<acc_t> vl(lse_safe), vx(raw_threshold(threshold, tau)), v_neg_g(-g_tau),
      zero(acc_t(0));
  for (int64_t begin = 0; begin < V; begin += kChunk) {
    const int64_t n = std::min(kChunk, V - begin);
    const int64_t n_pad = copy_padded(x + begin, n, buf);
    for (int64_t i = 0; i < n_pad; i += W) {
      const Vec<acc_t> v = Vec<acc_t>::loadu(buf + i);
      // d logprob / dz_j = -p~_j on S (x_j >= x_thr, as the forward decides it), 0 off S
      const Vec<acc_t> p = Vec<acc_t>::blendv(zero, vexp(frame.d(v) - vl), v >= vx);
      (p * v_neg_g).store(buf + i);
    }
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::copy(buf, buf + n, grad + begin);
    } else {
      at::vec::convert(buf, grad + begin, n);
    }
  }
  // The label is in S whatever its logit: d logprob / dz_c = 1 - p~_c, rounded once.
  const acc_t p_c = std::exp(frame.d_label(acc_t(x[label])) - lse_safe);
  grad[label] = scalar_t((acc_t(1) - p_c) * g_tau);
}

}  // namespace

std::vector<at::Tensor> pruned_logprob_forward(const at::Tensor& logits, const at::Tensor& labels,
                                               const std::optional<at::Tensor>& temperature,
                                               double temperature_scalar, double alpha,
                                               int64_t ignore_index, int64_t n_inner,
                                               int64_t stride_outer, int64_t stride_inner) {
  const int64_t N = labels.numel();
  const int64_t V = logits.size(-1);
  check_row_inputs("pruned_logprob", logits, labels, temperature);
  check_labels_in_range("pruned_logprob", labels, V, ignore_index);
  TORCH_CHECK(alpha > 0 && alpha < 1, "pruned_logprob: alpha must be in (0, 1), got ", alpha);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = labels.options().dtype(acc_dtype);
  at::Tensor logprob = at::empty({N}, opts), in_safe = at::empty({N}, opts.dtype(at::kBool)),
             tail_mass = at::empty({N}, opts), lse_safe = at::empty({N}, opts),
             threshold = at::empty({N}, opts), row_max = at::empty({N}, opts);
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "pruned_logprob_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const RowTemperature<acc_t> tau{temperature ? temperature->const_data_ptr<acc_t>() : nullptr,
                                    acc_t(temperature_scalar)};
    const acc_t log_alpha = acc_t(std::log(alpha));
    acc_t *o_lp = logprob.data_ptr<acc_t>(), *o_tm = tail_mass.data_ptr<acc_t>(),
          *o_ls = lse_safe.data_ptr<acc_t>(), *o_th = threshold.data_ptr<acc_t>(),
          *o_mx = row_max.data_ptr<acc_t>();
    bool* o_in = in_safe.data_ptr<bool>();
    const LabelReader read_label(labels);
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kBufferSize<acc_t>];
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = read_label(r);
        if (c == ignore_index) {
          o_lp[r] = o_tm[r] = o_ls[r] = o_th[r] = o_mx[r] = acc_t(0);
          o_in[r] = false;
          continue;
        }
        const PrunedRow<acc_t> row =
            forward_row(x + layout.offset(r), V, tau(r), log_alpha, c, buf, o_th[r], o_mx[r]);
        o_lp[r] = row.logprob;
        o_tm[r] = row.tail_mass;
        o_ls[r] = row.lse_safe;
        o_in[r] = row.in_safe;
      }
    });
  });
  return {logprob, in_safe, tail_mass, lse_safe, threshold, row_max};
}

at::Tensor pruned_logprob_backward(const at::Tensor& grad_logprob, const at::Tensor& logits,
                                   const at::Tensor& labels,
                                   const std::optional<at::Tensor>& temperature,
                                   double temperature_scalar, int64_t ignore_index,
                                   const at::Tensor& lse_safe, const at::Tensor& threshold,
                                   const at::Tensor& row_max, int64_t n_inner,
                                   int64_t stride_outer, int64_t stride_inner) {
  const int64_t N = labels.numel();
  const int64_t V = logits.size(-1);
  check_row_inputs("pruned_logprob_backward", logits, labels, temperature);
  check_labels_in_range("pruned_logprob_backward", labels, V, ignore_index);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&grad_logprob, &lse_safe, &threshold, &row_max}) {
    TORCH_CHECK(t->dim() == 1 && t->numel() == N && t->is_contiguous() &&
                    t->scalar_type() == acc_dtype,
                "pruned_logprob_backward: per-row tensors must be contiguous ", acc_dtype, " [",
                N, "]");
  }
  at::Tensor grad = fresh_gradient(logits);  // contiguous: row r starts at r * V
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "pruned_logprob_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const RowTemperature<acc_t> tau{temperature ? temperature->const_data_ptr<acc_t>() : nullptr,
                                    acc_t(temperature_scalar)};
    const acc_t *g_lp = grad_logprob.const_data_ptr<acc_t>(),
                *s_ls = lse_safe.const_data_ptr<acc_t>(), *s_th = threshold.const_data_ptr<acc_t>(),
                *s_mx = row_max.const_data_ptr<acc_t>();
    const LabelReader read_label(labels);
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kBufferSize<acc_t>];
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* grad_row = g + r * V;
        const int64_t c = read_label(r);
        if (fill_skipped_row(grad_row, V, c == ignore_index, !is_finite(s_ls[r]))) continue;
        backward_row(x + layout.offset(r), V, tau(r), c, s_mx[r], s_ls[r], s_th[r], g_lp[r], buf,
                     grad_row);
      }
    });
  });
  return grad;
}

}  // namespace pg_kernels::cpu
