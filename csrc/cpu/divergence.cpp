// Divergences between two logit tensors on the CPU: kl_divergence and the exact part of
// mismatch_stats (docs/math.md §§4 and 5). One kernel family, one pair pass.
//
// Pair pass (softmax_stats.h, PairState): a row of a weight side z_w and an other side z_v is
// read once, chunk by chunk (each chunk loaded, converted and divided by tau into an
// L1-resident buffer, as vec_rows.h does for token_stats). Per chunk: both chunk maxes, then one exp per element of each side
// feeding s1_w, s1_v and u = sum e^{d_w} (d_w - d_v), kept per vector lane in two independent
// chains; the chunk's lanes sum to a chunk state that merges into the row state (two-level
// summation, like token_stats). Two exps per vocabulary entry: the floor of a forward KL.
//   kl_divergence forward   reads both [N, V] tensors once, writes 6 numbers per row
//                           (kl; each side's max and log s1 and E_w[d_w - d_v], saved for
//                           the backward).
//   kl_divergence backward  reads both once, writes the requested gradients once. The
//                           weight-side gradient needs only w_j (one exp per element); the
//                           other side's needs v_j too.
//   mismatch_stats forward  the pair pass with w = rollout, v = logits (forward KL(q || p))
//                           plus the label's log-prob and total variation 1/2 sum |p - q|.
//                           TV needs both normalizers, known only at the row's end: the pass
//                           keeps the per-element exps it computed (2 V floats per thread, in
//                           L2 for V = 32k) and the chunk maxes they are relative to; a second
//                           sweep over that scratch, with no exp and no read of the logits,
//                           sums |e_w a_k - e_v b_k| with per-chunk scales a_k = e^{m_w,k - L_w}.
//   mismatch_stats backward of logprob only: g (1[j = c] - p_j) / tau in one pass.
// Rows are independent, each computed by one thread in a fixed order: deterministic and
// batch invariant.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <memory>

#include "ops.h"
#include "vec_rows.h"

namespace pg_kernels::cpu {
namespace {

// buf[0, n) = src[0, n) / tau in acc_t, padded with -inf to a multiple of kStep; returns the
// chunk's max (NaN if it holds a NaN). z = x / tau is rounded once, like docs/math.md's and
// PyTorch's z (vec_rows.h's load_quotient_chunk, no division per element), not twice as
// x * (1 / tau) would: it matters where a small difference of large log-probs is the output
// (log_ratio = logprob - rollout_logprobs at logprob ~ -100, tau 0.5 on a peaked row, had 5x
// plain PyTorch's error with 1 / tau).
template <typename scalar_t, typename acc_t>
acc_t load_divided_chunk(const scalar_t* src, int64_t n, acc_t tau, acc_t* buf) {
  return load_quotient_chunk(src, n, tau, acc_t(1) / tau, buf);
}

// Per-row temperature: a per-row tensor when given, else the scalar.
template <typename acc_t>
struct RowTemperature {
  const acc_t* per_row;  // nullptr when the temperature is a scalar
  acc_t scalar;
  acc_t operator()(int64_t r) const { return per_row ? per_row[r] : scalar; }
};

// dst[0, n) = buf[0, n), rounded once to the output dtype.
template <typename acc_t, typename scalar_t>
void store_row(const acc_t* buf, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(buf, buf + n, dst);
  } else {
    at::vec::convert(buf, dst, n);
  }
}

// Per-lane sums of one chunk of a pair pass.
template <typename acc_t>
struct PairLanes {
  Vec<acc_t> s1w{acc_t(0)}, s1v{acc_t(0)}, u{acc_t(0)}, inf{acc_t(0)};

  // zw, zv: scaled logits; mw, mv: the chunk maxes (0 in place of -inf, see pair_chunk).
  // Returns e_w, e_v through ew, ev (kept by mismatch_stats for its TV sweep).
  void add(const Vec<acc_t>& zw, const Vec<acc_t>& zv, const Vec<acc_t>& mw,
           const Vec<acc_t>& mv, Vec<acc_t>& ew, Vec<acc_t>& ev) {
    const Vec<acc_t> lowest(exp_zero_below<acc_t>()), zero(acc_t(0)), ninf(neg_inf<acc_t>());
    // d_w clamped where exp is already 0: -inf weights give e_w = 0 and finite e_w * (...).
    const Vec<acc_t> dw = at::vec::clamp_min(zw - mw, lowest);
    const Vec<acc_t> dv = zv - mv;  // not clamped: a tiny v_j is a large, real log-ratio
    ew = vexp(dw);
    ev = vexp(at::vec::clamp_min(dv, lowest));
    s1w = s1w + ew;
    s1v = s1v + ev;
    // v_j = 0: the term is +inf when w_j > 0 (recorded in `inf`), and it is kept out of u by
    // taking d_v = d_w there (a zero difference). Elsewhere e_w = 0 makes the term 0.
    const Vec<acc_t> v_zero = dv == ninf;
    inf = inf | (v_zero & (ew > zero));
    u = at::vec::fmadd(ew, dw - Vec<acc_t>::blendv(dv, dw, v_zero), u);
  }
};

template <typename acc_t>
bool any_lane_set(const Vec<acc_t>& mask) {
  constexpr int64_t W = Vec<acc_t>::size();
  acc_t lanes[W];
  mask.store(lanes);
  for (int64_t i = 0; i < W; ++i) {
    if (lanes[i] != acc_t(0)) return true;  // an all-ones lane reads as NaN, != 0
  }
  return false;
}

// One chunk of a pair pass. bw, bv hold the scaled chunk (padded with -inf to a multiple of
// kStep); mw, mv are its maxes. kKeepExps: overwrite bw, bv with e^{z - m} of the chunk.
template <typename acc_t, bool kKeepExps>
PairState<acc_t> pair_chunk(acc_t* bw, acc_t* bv, int64_t n, acc_t mw, acc_t mv) {
  constexpr int64_t W = Vec<acc_t>::size();
  // A side with no finite entry yet has m = -inf; subtracting 0 instead keeps its d = -inf
  // (e = 0) rather than -inf - (-inf) = NaN. NaN / +inf maxes pass through: the row is NaN.
  const Vec<acc_t> vmw(mw == neg_inf<acc_t>() ? acc_t(0) : mw);
  const Vec<acc_t> vmv(mv == neg_inf<acc_t>() ? acc_t(0) : mv);
  PairLanes<acc_t> lo, hi;
  Vec<acc_t> ew, ev;
  const int64_t n_pad = round_up(n, kStep<acc_t>);
  for (int64_t i = 0; i < n_pad; i += 2 * W) {
    lo.add(Vec<acc_t>::loadu(bw + i), Vec<acc_t>::loadu(bv + i), vmw, vmv, ew, ev);
    if constexpr (kKeepExps) {
      ew.store(bw + i);
      ev.store(bv + i);
    }
    hi.add(Vec<acc_t>::loadu(bw + i + W), Vec<acc_t>::loadu(bv + i + W), vmw, vmv, ew, ev);
    if constexpr (kKeepExps) {
      ew.store(bw + i + W);
      ev.store(bv + i + W);
    }
  }
  return {mw, sum_lanes(lo.s1w + hi.s1w), mv, sum_lanes(lo.s1v + hi.s1v),
          sum_lanes(lo.u + hi.u), any_lane_set(lo.inf | hi.inf)};
}

// Neumaier summation of chunk totals into the row total: on a peaked row one chunk holds an
// O(log V) term of u (the top token's d_w - d_v) and ~V / kChunk later chunks add tiny totals
// to it, each rounding at ulp(u); the low parts below carry those roundings (measured on a
// near one-hot fp64 row at V = 151936 against a 40-digit mpmath truth: gradient error
// 1.2e-14 without, 1.7e-15 with; the fp64 PyTorch reference's is 4.1e-15).
template <typename acc_t>
struct RowSum {
  PairState<acc_t> hi = empty_pair<acc_t>();
  acc_t lo_s1w = 0, lo_s1v = 0, lo_u = 0;

  static acc_t add(acc_t& sum, acc_t x) {  // sum += x, returns the rounding error
    const acc_t s = sum + x;
    const acc_t e = std::abs(sum) >= std::abs(x) ? (sum - s) + x : (x - s) + sum;
    sum = s;
    return e;
  }

  void merge(const PairState<acc_t>& chunk) {
    const acc_t m_w = max_nan(hi.m_w, chunk.m_w), m_v = max_nan(hi.m_v, chunk.m_v);
    // The low parts rescale like the sums they belong to (rescale_pair, docs/math.md §1).
    const PairState<acc_t> lo =
        rescale_pair(PairState<acc_t>{hi.m_w, lo_s1w, hi.m_v, lo_s1v, lo_u, false}, m_w, m_v);
    const PairState<acc_t> a = rescale_pair(hi, m_w, m_v), b = rescale_pair(chunk, m_w, m_v);
    hi = a;
    hi.inf = hi.inf || chunk.inf;
    lo_s1w = lo.s1_w + add(hi.s1_w, b.s1_w);
    lo_s1v = lo.s1_v + add(hi.s1_v, b.s1_v);
    lo_u = lo.u + add(hi.u, b.u);
  }

  PairState<acc_t> total() const {
    return {hi.m_w, hi.s1_w + lo_s1w, hi.m_v, hi.s1_v + lo_s1v, hi.u + lo_u, hi.inf};
  }
};

// The pair pass over one row. Stops early once the v side is NaN / +inf (and the w side too
// when stop_on_w_invalid; mismatch_stats keeps going so that the logits' logsumexp survives a
// broken rollout row). kKeepExps: bw, bv are row-sized scratch that end up holding every
// e^{z - m_chunk}, and chunk_m[2k], chunk_m[2k + 1] the maxes of chunk k.
template <typename scalar_t, typename acc_t, bool kKeepExps>
PairState<acc_t> pair_row(const scalar_t* xw, acc_t tau_w, const scalar_t* xv, acc_t tau_v,
                          int64_t V, bool stop_on_w_invalid, acc_t* bw, acc_t* bv,
                          acc_t* chunk_m) {
  RowSum<acc_t> row;
  for (int64_t begin = 0, k = 0; begin < V; begin += kChunk, ++k) {
    const int64_t n = std::min(kChunk, V - begin);
    acc_t* cw = kKeepExps ? bw + begin : bw;
    acc_t* cv = kKeepExps ? bv + begin : bv;
    const acc_t mw = load_divided_chunk(xw + begin, n, tau_w, cw);
    const acc_t mv = load_divided_chunk(xv + begin, n, tau_v, cv);
    if constexpr (kKeepExps) {
      chunk_m[2 * k] = mw;
      chunk_m[2 * k + 1] = mv;
    }
    row.merge(pair_chunk<acc_t, kKeepExps>(cw, cv, n, mw, mv));
    if (!(row.hi.m_v < -neg_inf<acc_t>())) break;  // NaN or +inf: the row is NaN, stop early
    if (stop_on_w_invalid && !(row.hi.m_w < -neg_inf<acc_t>())) break;
  }
  return row.total();
}

// 1/2 sum |w_j - v_j| from the exps a pair_row<kKeepExps> pass left in ew, ev:
// w_j = ew_j e^{(m_w,k - m_w) - l_w} with m_w,k the max of the chunk k that holds j (m_w the
// row's max, l_w = log s1_w; shifting by m_w first is exact for the chunk holding the max).
// No exp per element.
template <typename acc_t>
acc_t total_variation(const acc_t* ew, const acc_t* ev, const acc_t* chunk_m, int64_t V,
                      acc_t m_w, acc_t log_s1_w, acc_t m_v, acc_t log_s1_v) {
  constexpr int64_t W = Vec<acc_t>::size();
  acc_t total = 0;
  for (int64_t begin = 0, k = 0; begin < V; begin += kChunk, ++k) {
    const int64_t n_pad = round_up(std::min(kChunk, V - begin), kStep<acc_t>);
    const acc_t mw = chunk_m[2 * k], mv = chunk_m[2 * k + 1];
    // A chunk whose side was all -inf holds e = 0 there; its scale is irrelevant (use 0).
    const Vec<acc_t> a(mw == neg_inf<acc_t>() ? acc_t(0) : std::exp((mw - m_w) - log_s1_w));
    const Vec<acc_t> b(mv == neg_inf<acc_t>() ? acc_t(0) : std::exp((mv - m_v) - log_s1_v));
    Vec<acc_t> lo(acc_t(0)), hi(acc_t(0));
    for (int64_t i = begin; i < begin + n_pad; i += 2 * W) {
      lo = lo + (Vec<acc_t>::loadu(ew + i) * a - Vec<acc_t>::loadu(ev + i) * b).abs();
      hi = hi + (Vec<acc_t>::loadu(ew + i + W) * a - Vec<acc_t>::loadu(ev + i + W) * b).abs();
    }
    total += sum_lanes(lo + hi);
  }
  const acc_t tv = acc_t(0.5) * total;
  return tv < acc_t(1) ? tv : acc_t(1);
}

// Per-row numbers kl_divergence saves for its backward: (m, log s1) of the logits, of the
// reference, and c = E_w[d_w - d_v].
constexpr int64_t kRowState = 5;

// One side's row state as the backward needs it: max m and log s1 (NaN when invalid).
template <typename acc_t>
struct SideState {
  acc_t m, log_s1;
};

template <typename acc_t>
SideState<acc_t> side_state(acc_t m, acc_t s1) {
  if (!side_is_valid(m)) return {quiet_nan<acc_t>(), quiet_nan<acc_t>()};
  return {m, std::log(s1)};
}

// Gradients of KL(w || v) for one row, times the upstream gradient g (docs/math.md §4), from
// d = z - m and l = log s1 of each side and c = E_w[d_w - d_v] (softmax_stats.h):
//   grad_w,j = g / tau_w * w_j ((d_w,j - d_v,j) - c),  w_j = e^{d_w,j - l_w},  0 where w_j = 0
//   grad_v,j = g / tau_v * (v_j - w_j),                 v_j = e^{d_v,j - l_v}
// kW / kV: which gradients to write; only grad_v needs v_j's exp.
template <typename scalar_t, typename acc_t, bool kW, bool kV>
void kl_backward_row(const scalar_t* xw, acc_t tau_w, const scalar_t* xv, acc_t tau_v,
                     int64_t V, SideState<acc_t> sw, SideState<acc_t> sv, acc_t c, acc_t gw,
                     acc_t gv, acc_t* bw, acc_t* bv, scalar_t* grad_w, scalar_t* grad_v) {
  constexpr int64_t W = Vec<acc_t>::size();
  const Vec<acc_t> vmw(sw.m), vlw(sw.log_s1), vmv(sv.m), vlv(sv.log_s1), vc(c), vgw(gw),
      vgv(gv), zero(acc_t(0)), lowest(exp_zero_below<acc_t>());
  for (int64_t begin = 0; begin < V; begin += kChunk) {
    const int64_t n = std::min(kChunk, V - begin);
    load_divided_chunk(xw + begin, n, tau_w, bw);
    load_divided_chunk(xv + begin, n, tau_v, bv);
    for (int64_t i = 0; i < n; i += W) {
      const Vec<acc_t> dw = Vec<acc_t>::loadu(bw + i) - vmw;
      const Vec<acc_t> dv = Vec<acc_t>::loadu(bv + i) - vmv;
      const Vec<acc_t> w = vexp(at::vec::clamp_min(dw - vlw, lowest));
      if constexpr (kW) {
        // d/dz_w of sum w (log w - log v) = w_j (log w_j - log v_j - KL); the blend keeps
        // w_j = 0 terms at exactly 0 when z_v = -inf too ((-inf) - (-inf) = NaN).
        const Vec<acc_t> g = w * ((dw - dv) - vc) * vgw;
        Vec<acc_t>::blendv(g, zero, w == zero).store(bw + i);
      }
      if constexpr (kV) {
        // d/dz_v of -sum w log v = v_j sum w - w_j = v_j - w_j
        const Vec<acc_t> v = vexp(at::vec::clamp_min(dv - vlv, lowest));
        ((v - w) * vgv).store(bv + i);
      }
    }
    if constexpr (kW) store_row(bw, grad_w + begin, n);
    if constexpr (kV) store_row(bv, grad_v + begin, n);
  }
}

int64_t grain_rows(int64_t V) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(V, 1));
}

template <typename acc_t>
const acc_t* optional_data(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<acc_t>() : nullptr;
}

// Row-sized scratch of one thread for mismatch_stats' TV sweep: e_w, e_v and chunk maxes.
template <typename acc_t>
struct ExpScratch {
  int64_t padded;
  std::unique_ptr<acc_t[]> data;
  explicit ExpScratch(int64_t V)
      : padded(round_up(V, kStep<acc_t>)),
        data(new acc_t[2 * padded + 2 * ((V + kChunk - 1) / kChunk)]) {}
  acc_t* ew() { return data.get(); }
  acc_t* ev() { return data.get() + padded; }
  acc_t* chunk_m() { return data.get() + 2 * padded; }
};

}  // namespace

std::vector<at::Tensor> kl_divergence_forward(
    const at::Tensor& logits, const at::Tensor& ref_logits,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& temperature,
    double temperature_scalar, const std::optional<at::Tensor>& ref_temperature,
    double ref_temperature_scalar, int64_t ignore_index, bool reverse, int64_t n_inner,
    int64_t stride_outer, int64_t stride_inner, int64_t ref_n_inner, int64_t ref_stride_outer,
    int64_t ref_stride_inner) {
  const int64_t V = logits.size(-1);
  const int64_t N = V > 0 ? logits.numel() / V : 0;
  check_pair_inputs("kl_divergence", logits, ref_logits, labels, temperature, ref_temperature);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits.options().dtype(acc_dtype);
  // kl [N]; row_state [N, 5] = (max, log s1) of the logits, then of ref_logits, then
  // c = E_w[d_w - d_v] (softmax_stats.h, kl_grad_shift): what the backward needs.
  at::Tensor kl = at::empty({N}, opts), row_state = at::empty({N, kRowState}, opts);
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  const RowLayout ref_layout{ref_n_inner, ref_stride_outer, ref_stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "kl_divergence_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t *x = logits.const_data_ptr<scalar_t>(),
                       *xr = ref_logits.const_data_ptr<scalar_t>();
        const RowTemperature<acc_t> tau{optional_data<acc_t>(temperature),
                                        acc_t(temperature_scalar)};
        const RowTemperature<acc_t> tau_r{optional_data<acc_t>(ref_temperature),
                                          acc_t(ref_temperature_scalar)};
        acc_t *o_kl = kl.data_ptr<acc_t>(), *o_st = row_state.data_ptr<acc_t>();
        const std::optional<LabelReader> read_label =
            labels ? std::optional<LabelReader>(LabelReader(*labels)) : std::nullopt;
        // fp32 rows run the pair pass in double (pass_t), rounded once at the end. In fp32 the
        // KL of near-equal rows, c - log s1_w + log s1_v, cancels O(1) terms each carrying the
        // fp32 rounding of its sum (s1 = 1 + small rounds at ulp(1) / 2, 6e-8): a KL of 1.6e-6
        // (tau 16.7, V = 3) was off by 5.1e-9 where plain fp32 PyTorch happened to be off by
        // 2.0e-9; in double 2.0e-13, the rounding of the result to fp32
        // (tests/test_kl_divergence.py::test_near_equal_rows_fp32). The backward keeps fp32:
        // it needs no sum. 16-bit rows stay in fp32 (plain PyTorch at their precision is far
        // coarser). Cost: the double exps; at [256, 32000] fp32, tau 0.7, one thread, 53-55 ms
        // against 22-23 ms for the fp32 pass (2.4x). Summing fp32 exps into double lanes
        // (token_stats' S1Lanes) would keep most of that speed, but needs a pair pass whose
        // chunk state is double while its elements stay fp32.
        using pass_t = std::conditional_t<std::is_same_v<scalar_t, float>, double, acc_t>;
        at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
          alignas(64) pass_t bw[kBufferSize<pass_t>];
          alignas(64) pass_t bv[kBufferSize<pass_t>];
          for (int64_t r = begin; r < end; ++r) {
            acc_t* st = o_st + kRowState * r;
            if (read_label && (*read_label)(r) == ignore_index) {
              o_kl[r] = acc_t(0);
              std::fill(st, st + kRowState, acc_t(0));
              continue;
            }
            const scalar_t *xp = x + layout.offset(r), *xq = xr + ref_layout.offset(r);
            const pass_t tp = tau(r), tq = tau_r(r);
            // reverse KL(p || q): weight side p; forward KL(q || p): weight side q.
            const PairState<pass_t> s =
                reverse ? pair_row<scalar_t, pass_t, false>(xp, tp, xq, tq, V, true, bw, bv, nullptr)
                        : pair_row<scalar_t, pass_t, false>(xq, tq, xp, tp, V, true, bw, bv, nullptr);
            const SideState<pass_t> w = side_state(s.m_w, s.s1_w), v = side_state(s.m_v, s.s1_v);
            const SideState<pass_t>&p = reverse ? w : v, &q = reverse ? v : w;
            o_kl[r] = acc_t(finalize_kl(s));
            st[0] = acc_t(p.m);
            st[1] = acc_t(p.log_s1);
            st[2] = acc_t(q.m);
            st[3] = acc_t(q.log_s1);
            st[4] = acc_t(kl_grad_shift(s));
          }
        });
      });
  return {kl, row_state};
}

std::vector<at::Tensor> kl_divergence_backward(
    const at::Tensor& grad_kl, const at::Tensor& logits, const at::Tensor& ref_logits,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& temperature,
    double temperature_scalar, const std::optional<at::Tensor>& ref_temperature,
    double ref_temperature_scalar, int64_t ignore_index, bool reverse, const at::Tensor& kl,
    const at::Tensor& row_state, bool need_logits_grad, bool need_ref_grad, int64_t n_inner,
    int64_t stride_outer, int64_t stride_inner, int64_t ref_n_inner, int64_t ref_stride_outer,
    int64_t ref_stride_inner) {
  const int64_t V = logits.size(-1);
  const int64_t N = V > 0 ? logits.numel() / V : 0;
  check_pair_inputs("kl_divergence_backward", logits, ref_logits, labels, temperature,
                    ref_temperature);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&grad_kl, &kl, &row_state}) {
    TORCH_CHECK(t->scalar_type() == acc_dtype && t->is_contiguous(),
                "kl_divergence_backward: grad_kl, kl and row_state must be contiguous ",
                acc_dtype);
  }
  TORCH_CHECK(grad_kl.numel() == N && kl.numel() == N && row_state.numel() == kRowState * N,
              "kl_divergence_backward: expected ", N, " rows in grad_kl, kl and row_state");
  // Fresh contiguous gradients (row r at r * V); an empty tensor for a side not requested.
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor grad = need_logits_grad
                        ? at::empty(logits.sizes(), logits.options().memory_format(contiguous))
                        : at::empty({0}, logits.options());
  at::Tensor grad_ref =
      need_ref_grad ? at::empty(ref_logits.sizes(), ref_logits.options().memory_format(contiguous))
                    : at::empty({0}, ref_logits.options());
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  const RowLayout ref_layout{ref_n_inner, ref_stride_outer, ref_stride_inner};
  // The weight side w is the logits for reverse KL(p || q), the reference for forward.
  const bool need_w = reverse ? need_logits_grad : need_ref_grad;
  const bool need_v = reverse ? need_ref_grad : need_logits_grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "kl_divergence_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t *x = logits.const_data_ptr<scalar_t>(),
                       *xr = ref_logits.const_data_ptr<scalar_t>();
        scalar_t* g = need_logits_grad ? grad.data_ptr<scalar_t>() : nullptr;
        scalar_t* gr = need_ref_grad ? grad_ref.data_ptr<scalar_t>() : nullptr;
        const RowTemperature<acc_t> tau{optional_data<acc_t>(temperature),
                                        acc_t(temperature_scalar)};
        const RowTemperature<acc_t> tau_r{optional_data<acc_t>(ref_temperature),
                                          acc_t(ref_temperature_scalar)};
        const acc_t *up = grad_kl.const_data_ptr<acc_t>(), *s_kl = kl.const_data_ptr<acc_t>(),
                    *s_st = row_state.const_data_ptr<acc_t>();
        const std::optional<LabelReader> read_label =
            labels ? std::optional<LabelReader>(LabelReader(*labels)) : std::nullopt;
        at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
          alignas(64) acc_t bw[kBufferSize<acc_t>];
          alignas(64) acc_t bv[kBufferSize<acc_t>];
          for (int64_t r = begin; r < end; ++r) {
            scalar_t* gp = g ? g + r * V : nullptr;
            scalar_t* gq = gr ? gr + r * V : nullptr;
            auto fill = [V](scalar_t* row, acc_t value) {
              if (row) std::fill(row, row + V, scalar_t(value));
            };
            const acc_t* st = s_st + kRowState * r;
            const SideState<acc_t> p{st[0], st[1]}, q{st[2], st[3]};
            const acc_t kl_r = s_kl[r];
            bool state_ok = true;  // the maxes and log s1 of both sides
            for (int i = 0; i < 4; ++i) state_ok = state_ok && is_finite(st[i]);
            if (read_label && (*read_label)(r) == ignore_index) {
              fill(gp, 0);
              fill(gq, 0);
            } else if (!state_ok || kl_r != kl_r) {  // a NaN row stays NaN
              fill(gp, quiet_nan<acc_t>());
              fill(gq, quiet_nan<acc_t>());
            } else if (up[r] == acc_t(0)) {  // also keeps a masked-out +inf row's gradient 0
              fill(gp, 0);
              fill(gq, 0);
            } else {
              scalar_t* grad_w = reverse ? gp : gq;
              scalar_t* grad_v = reverse ? gq : gp;
              // KL = +inf (some w_j > 0 has v_j = 0): the weight side's gradient is undefined
              // (NaN); the other side's, v - w, is finite and exact.
              const bool w_inf = !(kl_r < -neg_inf<acc_t>());
              const bool do_w = need_w && !w_inf;
              if (need_w && w_inf) fill(grad_w, quiet_nan<acc_t>());
              const scalar_t *xp = x + layout.offset(r), *xq = xr + ref_layout.offset(r);
              const acc_t tp = tau(r), tq = tau_r(r);
              const scalar_t *xw = reverse ? xp : xq, *xv = reverse ? xq : xp;
              const acc_t tw = reverse ? tp : tq, tv = reverse ? tq : tp;
              const SideState<acc_t> sw = reverse ? p : q, sv = reverse ? q : p;
              const acc_t c = st[4];
              const acc_t gw = up[r] / tw, gv = up[r] / tv;  // d/dx = d/dz / tau
              if (do_w && need_v) {
                kl_backward_row<scalar_t, acc_t, true, true>(xw, tw, xv, tv, V, sw, sv, c, gw,
                                                             gv, bw, bv, grad_w, grad_v);
              } else if (do_w) {
                kl_backward_row<scalar_t, acc_t, true, false>(xw, tw, xv, tv, V, sw, sv, c, gw,
                                                              gv, bw, bv, grad_w, grad_v);
              } else if (need_v) {
                kl_backward_row<scalar_t, acc_t, false, true>(xw, tw, xv, tv, V, sw, sv, c, gw,
                                                              gv, bw, bv, grad_w, grad_v);
              }
            }
          }
        });
      });
  return {grad, grad_ref};
}

std::vector<at::Tensor> mismatch_stats_forward(
    const at::Tensor& logits, const at::Tensor& rollout_logits, const at::Tensor& labels,
    const std::optional<at::Tensor>& temperature, double temperature_scalar,
    const std::optional<at::Tensor>& rollout_temperature, double rollout_temperature_scalar,
    int64_t ignore_index, int64_t n_inner, int64_t stride_outer, int64_t stride_inner,
    int64_t rollout_n_inner, int64_t rollout_stride_outer, int64_t rollout_stride_inner) {
  const int64_t V = logits.size(-1);
  const int64_t N = labels.numel();
  check_pair_inputs("mismatch_stats", logits, rollout_logits, labels, temperature,
                    rollout_temperature);
  check_labels_in_range("mismatch_stats", labels, V, ignore_index);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits.options().dtype(acc_dtype);
  // row_state [N, 2]: the logits' (max, log s1), saved for the backward of logprob.
  at::Tensor logprob = at::empty({N}, opts), token_kl = at::empty({N}, opts),
             token_tv = at::empty({N}, opts), row_state = at::empty({N, 2}, opts);
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  const RowLayout roll_layout{rollout_n_inner, rollout_stride_outer, rollout_stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "mismatch_stats_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t *x = logits.const_data_ptr<scalar_t>(),
                       *xr = rollout_logits.const_data_ptr<scalar_t>();
        const RowTemperature<acc_t> tau{optional_data<acc_t>(temperature),
                                        acc_t(temperature_scalar)};
        const RowTemperature<acc_t> tau_r{optional_data<acc_t>(rollout_temperature),
                                          acc_t(rollout_temperature_scalar)};
        acc_t *o_lp = logprob.data_ptr<acc_t>(), *o_kl = token_kl.data_ptr<acc_t>(),
              *o_tv = token_tv.data_ptr<acc_t>(), *o_st = row_state.data_ptr<acc_t>();
        const LabelReader read_label(labels);
        at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
          ExpScratch<acc_t> scratch(V);
          for (int64_t r = begin; r < end; ++r) {
            const int64_t c = read_label(r);
            if (c == ignore_index) {
              o_lp[r] = o_kl[r] = o_tv[r] = o_st[2 * r] = o_st[2 * r + 1] = acc_t(0);
              continue;
            }
            const scalar_t *xp = x + layout.offset(r), *xq = xr + roll_layout.offset(r);
            const acc_t tp = tau(r);
            // KL(pi_roll || pi_theta): the weight side is the rollout distribution q.
            const PairState<acc_t> s = pair_row<scalar_t, acc_t, true>(
                xq, tau_r(r), xp, tp, V, false, scratch.ew(), scratch.ev(),
                scratch.chunk_m());
            const SideState<acc_t> q = side_state(s.m_w, s.s1_w), p = side_state(s.m_v, s.s1_v);
            o_st[2 * r] = p.m;
            o_st[2 * r + 1] = p.log_s1;
            o_lp[r] = (acc_t(xp[c]) / tp - p.m) - p.log_s1;  // NaN when the logits row is
            o_kl[r] = finalize_kl(s);
            o_tv[r] = (side_is_valid(s.m_w) && side_is_valid(s.m_v))
                          ? total_variation(scratch.ew(), scratch.ev(), scratch.chunk_m(), V,
                                            q.m, q.log_s1, p.m, p.log_s1)
                          : quiet_nan<acc_t>();
          }
        });
      });
  return {logprob, token_kl, token_tv, row_state};
}

// d logprob / dx_j = g (1[j = c] - p_j) / tau, p_j = e^{(z_j - m) - l} from the saved (m, l).
// The label's entry is g (-expm1(log p_c)) / tau: no cancellation of 1 - p_c when p_c -> 1.
// Reads N V logits, writes N V gradient (fresh, contiguous).
at::Tensor mismatch_stats_backward(const at::Tensor& grad_logprob, const at::Tensor& logits,
                                   const at::Tensor& labels,
                                   const std::optional<at::Tensor>& temperature,
                                   double temperature_scalar, int64_t ignore_index,
                                   const at::Tensor& row_state, int64_t n_inner,
                                   int64_t stride_outer, int64_t stride_inner) {
  const int64_t V = logits.size(-1);
  const int64_t N = labels.numel();
  check_row_inputs("mismatch_stats_backward", logits, labels, temperature);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&grad_logprob, &row_state}) {
    TORCH_CHECK(t->scalar_type() == acc_dtype && t->is_contiguous(),
                "mismatch_stats_backward: grad_logprob and row_state must be contiguous ",
                acc_dtype);
  }
  TORCH_CHECK(grad_logprob.numel() == N && row_state.numel() == 2 * N,
              "mismatch_stats_backward: expected ", N, " rows in grad_logprob and row_state");
  at::Tensor grad =
      at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const RowLayout layout{n_inner, stride_outer, stride_inner};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "mismatch_stats_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int64_t W = Vec<acc_t>::size();
        const scalar_t* x = logits.const_data_ptr<scalar_t>();
        scalar_t* g = grad.data_ptr<scalar_t>();
        const RowTemperature<acc_t> tau{optional_data<acc_t>(temperature),
                                        acc_t(temperature_scalar)};
        const acc_t *up = grad_logprob.const_data_ptr<acc_t>(),
                    *st = row_state.const_data_ptr<acc_t>();
        const LabelReader read_label(labels);
        at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
          alignas(64) acc_t buf[kBufferSize<acc_t>];
          for (int64_t r = begin; r < end; ++r) {
            scalar_t* grad_row = g + r * V;
            const int64_t c = read_label(r);
            const acc_t m = st[2 * r], l = st[2 * r + 1];
            const bool nan_row = !(is_finite(m) && is_finite(l));
            if (fill_skipped_row(grad_row, V, c == ignore_index, nan_row)) continue;
            const scalar_t* xr = x + layout.offset(r);
            const acc_t t = tau(r), gt = up[r] / t;
            const Vec<acc_t> vm(m), vl(l), vneg(-gt), lowest(exp_zero_below<acc_t>());
            for (int64_t b = 0; b < V; b += kChunk) {
              const int64_t n = std::min(kChunk, V - b);
              load_divided_chunk(xr + b, n, t, buf);
              for (int64_t i = 0; i < n; i += W) {
                // d/dz_j of -(L) = -p_j
                const Vec<acc_t> d = at::vec::clamp_min(Vec<acc_t>::loadu(buf + i) - vm - vl, lowest);
                (vneg * vexp(d)).store(buf + i);
              }
              store_row(buf, grad_row + b, n);
            }
            // d/dz_c of z_c - L = 1 - p_c = -expm1(log p_c), added before the one rounding.
            const acc_t log_pc = (acc_t(xr[c]) / t - m) - l;
            grad_row[c] = scalar_t(-std::expm1(log_pc) * gt);
          }
        });
      });
  return grad;
}

}  // namespace pg_kernels::cpu
