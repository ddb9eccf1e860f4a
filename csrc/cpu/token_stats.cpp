// token_stats on the CPU: docs/math.md §§1-3.
//
// Forward: one pass over each row. Per chunk of the row (vec_rows.h): load + z = x / tau (rounded
// once, like PyTorch's z: quotient_rn, no division) + max, then one exp per element feeding the
// three sums of the accumulator, kept per vector lane and rescaled once per chunk when the max
// rises. Lanes merge in a fixed order at the row's end. log p_c = (z_c - m) - log s1.
// Reads N*V logits once, writes 7 numbers per row.
// Backward: one pass; recomputes log p_j = (z_j - m) - log s1 relative to the row max, with m =
// z at the saved argmax and log s1 = -log(max_prob) (both saved by the forward), and writes the
// gradient once (reads N*V, writes N*V). Not z_j - L: the saved fp32 L carries ulp(L) / 2
// (1.9e-6 at L ~ 40), i.e. that relative error on every p_j, 1.9e-6 on p ~ 1 where PyTorch's
// error is ~1e-7; z_j - m is exact near the max, and log s1 = -log(1 / s1) is accurate to
// ~1e-7 absolute.
// Accuracy (fp32 [16, 4000], tau 0.7, peaked rows p 0.996-0.99996, lse 40, float64 truth;
// tests/test_token_stats.py::test_peaked_rows_logprob_gradient): log-prob gradient max error
// 4.9e-6 with x (1 / tau) and z - L, 4.3e-7 relative to the max with s1 summed in fp32, 1.7e-7
// with s1 in double lanes (S1Lanes; plain fp32 PyTorch: 3.5e-7); logprob 3.5e-6 -> 2.6e-6
// (PyTorch 2.6e-6). Forward time at [512, 32000] fp32 unchanged within this 2-core box's noise
// (12-28 ms before and after).
// Rows are independent and each is computed by one thread in a fixed order, so results are
// deterministic and do not depend on the batch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "ops.h"
#include "token_rows.h"

namespace pg_kernels::cpu {
namespace {

template <typename scalar_t, typename acc_t>
void forward_row(const scalar_t* x, int64_t V, Temperature<acc_t> tau, int64_t label, acc_t* buf,
                 TokenStatsRow<acc_t>& out, int64_t& argmax) {
  constexpr int64_t W = Vec<acc_t>::size();
  // Sums run in two levels: per chunk (two independent chains of at most kChunk / (2 W)
  // terms per lane), then chunk totals into the row total. Summation error then grows with
  // kChunk / (2 W) + V / kChunk terms instead of V / (2 W), close to PyTorch's cascade sum.
  LaneSums<acc_t> row;
  acc_t m = neg_inf<acc_t>();
  argmax = 0;
  for (int64_t begin = 0; begin < V; begin += kChunk) {
    const int64_t n = std::min(kChunk, V - begin);
    const acc_t chunk_max = load_quotient_chunk(x + begin, n, tau.tau, tau.r, buf);
    if (!(chunk_max <= m)) {  // a new max, or a NaN
      row.rescale(m, chunk_max);
      m = chunk_max;
      // Strictly greater than every earlier max: its first index here is the row's first argmax.
      argmax = begin + (std::find(buf, buf + n, chunk_max) - buf);
    }
    if (!(m < -neg_inf<acc_t>())) break;  // NaN or +inf: the row is NaN, stop early
    if (m == neg_inf<acc_t>()) continue;  // nothing but -inf so far
    const Vec<acc_t> vm(m);
    LaneSums<acc_t> lo, hi;
    const int64_t n_pad = round_up(n, kStep<acc_t>);
    for (int64_t i = 0; i < n_pad; i += 2 * W) {
      lo.add(Vec<acc_t>::loadu(buf + i), vm);
      hi.add(Vec<acc_t>::loadu(buf + i + W), vm);
    }
    row.add(lo, hi);
  }
  const SoftmaxState<acc_t> state = row.state(m);
  out = finalize_token_stats(state, tau.divide(acc_t(x[label])));
  if (!state_is_valid(state)) argmax = -1;
}

template <typename scalar_t, typename acc_t>
void backward_row(const scalar_t* x, int64_t V, Temperature<acc_t> tau, int64_t label,
                  const BackwardRow<acc_t>& row, acc_t* buf, scalar_t* grad) {
  constexpr int64_t W = Vec<acc_t>::size();
  const Vec<acc_t> vm(row.m), vls(row.log_s1), va(row.a), vb(row.b), vc(row.c);
  const Vec<acc_t> lowest(exp_zero_below<acc_t>());
  for (int64_t begin = 0; begin < V; begin += kChunk) {
    const int64_t n = std::min(kChunk, V - begin);
    load_quotient_chunk(x + begin, n, tau.tau, tau.r, buf);
    for (int64_t i = 0; i < n; i += W) {
      // d = log p_j = (z_j - m) - log s1: z_j - m is exact near the max.
      const Vec<acc_t> d = at::vec::clamp_min((Vec<acc_t>::loadu(buf + i) - vm) - vls, lowest);
      const Vec<acc_t> p = vexp(d);
      // dz/tau = p (a + b d + c p) / tau
      (p * at::vec::fmadd(vc, p, at::vec::fmadd(vb, d, va))).store(buf + i);
    }
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::copy(buf, buf + n, grad + begin);
    } else {
      at::vec::convert(buf, grad + begin, n);
    }
  }
  // The label's entry gets + g_l / tau, added in double before the one rounding to scalar_t
  // (on a peaked row g_l - p_c g_l is then exact: no cancellation beyond p_c's own rounding).
  const acc_t d_c =
      std::max((tau.divide(acc_t(x[label])) - row.m) - row.log_s1, exp_zero_below<acc_t>());
  const double p_c = std::exp(d_c);
  grad[label] = scalar_t(p_c * (row.a_d + row.b_d * d_c + row.c_d * p_c) + row.g_l);
}

}  // namespace

std::vector<at::Tensor> token_stats_forward(const at::Tensor& logits, const at::Tensor& labels,
                                            const std::optional<at::Tensor>& temperature,
                                            double temperature_scalar, int64_t ignore_index,
                                            int64_t n_inner, int64_t stride_outer,
                                            int64_t stride_inner) {
  const int64_t N = labels.numel();
  const int64_t V = logits.size(-1);
  check_row_inputs("token_stats", logits, labels, temperature);
  check_labels_in_range("token_stats", labels, V, ignore_index);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = labels.options().dtype(acc_dtype);
  at::Tensor logprob = at::empty({N}, opts), entropy = at::empty({N}, opts),
             collision = at::empty({N}, opts), lgp = at::empty({N}, opts),
             lse = at::empty({N}, opts), max_prob = at::empty({N}, opts),
             argmax = at::empty({N}, opts.dtype(at::kLong));
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_stats_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const RowTemperature<acc_t> tau{temperature ? temperature->const_data_ptr<acc_t>() : nullptr,
                                    acc_t(temperature_scalar)};
    acc_t *o_lp = logprob.data_ptr<acc_t>(), *o_h = entropy.data_ptr<acc_t>(),
          *o_c = collision.data_ptr<acc_t>(), *o_w = lgp.data_ptr<acc_t>(),
          *o_l = lse.data_ptr<acc_t>(), *o_mp = max_prob.data_ptr<acc_t>();
    int64_t* o_am = argmax.data_ptr<int64_t>();
    const LabelReader read_label(labels);
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kBufferSize<acc_t>];
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = read_label(r);
        if (c == ignore_index) {
          o_lp[r] = o_h[r] = o_c[r] = o_w[r] = o_l[r] = o_mp[r] = acc_t(0);
          o_am[r] = 0;
          continue;
        }
        TokenStatsRow<acc_t> row;
        forward_row(x + layout.offset(r), V, tau(r), c, buf, row, o_am[r]);
        o_lp[r] = row.logprob;
        o_h[r] = row.entropy;
        o_c[r] = row.collision;
        o_w[r] = row.lgp;
        o_l[r] = row.lse;
        o_mp[r] = row.max_prob;
      }
    });
  });
  return {logprob, entropy, collision, lgp, lse, max_prob, argmax};
}

at::Tensor token_stats_backward(const at::Tensor& grad_logprob, const at::Tensor& grad_entropy,
                                const at::Tensor& grad_collision, const at::Tensor& grad_lse,
                                const at::Tensor& logits, const at::Tensor& labels,
                                const std::optional<at::Tensor>& temperature,
                                double temperature_scalar, int64_t ignore_index,
                                const at::Tensor& lse, const at::Tensor& entropy,
                                const at::Tensor& collision, const at::Tensor& max_prob,
                                const at::Tensor& argmax, int64_t n_inner, int64_t stride_outer,
                                int64_t stride_inner) {
  const int64_t N = labels.numel();
  const int64_t V = logits.size(-1);
  check_row_inputs("token_stats_backward", logits, labels, temperature);
  check_labels_in_range("token_stats_backward", labels, V, ignore_index);
  for (const at::Tensor* t : {&grad_logprob, &grad_entropy, &grad_collision, &grad_lse, &lse,
                              &entropy, &collision, &max_prob}) {
    TORCH_CHECK(t->is_contiguous() && t->numel() == N && t->scalar_type() == lse.scalar_type(),
                "token_stats_backward: per-row tensors must be contiguous with ", N,
                " elements of one dtype");
  }
  TORCH_CHECK(lse.scalar_type() == (logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
              "token_stats_backward: per-row tensors must be fp32 (fp64 for fp64 logits)");
  TORCH_CHECK(argmax.is_contiguous() && argmax.numel() == N && argmax.scalar_type() == at::kLong,
              "token_stats_backward: argmax must be a contiguous int64 tensor of ", N,
              " elements");
  // The gradient is a fresh contiguous tensor: row r starts at r * V.
  at::Tensor grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_stats_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const RowTemperature<acc_t> tau{temperature ? temperature->const_data_ptr<acc_t>() : nullptr,
                                    acc_t(temperature_scalar)};
    const acc_t *g_lp = grad_logprob.const_data_ptr<acc_t>(), *g_h = grad_entropy.const_data_ptr<acc_t>(),
                *g_c = grad_collision.const_data_ptr<acc_t>(), *g_l = grad_lse.const_data_ptr<acc_t>(),
                *s_l = lse.const_data_ptr<acc_t>(), *s_h = entropy.const_data_ptr<acc_t>(),
                *s_c = collision.const_data_ptr<acc_t>(), *s_mp = max_prob.const_data_ptr<acc_t>();
    const int64_t* s_am = argmax.const_data_ptr<int64_t>();
    const LabelReader read_label(labels);
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kBufferSize<acc_t>];
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* grad_row = g + r * V;
        const int64_t c = read_label(r);
        const scalar_t* x_row = x + layout.offset(r);
        const Temperature<acc_t> t = tau(r);
        BackwardRow<acc_t> row;
        const bool ignored = c == ignore_index;
        const bool valid = !ignored && is_finite(s_l[r]) &&
                           backward_row_state(x_row, V, t, s_am[r], s_mp[r], g_lp[r], g_h[r],
                                              g_c[r], g_l[r], s_h[r], s_c[r], row);
        if (fill_skipped_row(grad_row, V, ignored, !valid)) continue;
        backward_row(x_row, V, t, c, row, buf, grad_row);
      }
    });
  });
  return grad;
}

}  // namespace pg_kernels::cpu
