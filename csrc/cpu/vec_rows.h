// CPU building blocks for one-pass row kernels over [N, V] logits.
//
// A row is processed in chunks of kChunk elements: a chunk is loaded once from memory,
// converted to the accumulation type and scaled by 1/tau (z = x / tau, or d = (x - x_max) / tau
// relative to a max) into a small L1-resident buffer, and every later step of the chunk (max,
// exp, sums) reads that buffer. So each logit is read from
// memory exactly once per pass, whatever its dtype.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "pg_kernels/softmax_stats.h"

namespace pg_kernels::cpu {

constexpr int64_t kChunk = 2048;

// For the helpers called once per vector in the row loops. Past GCC's function-growth limits
// (the row lambdas inline whole kernels) they were left as out-of-line calls through the PLT,
// and every lane accumulator of the caller was spilled to the stack around each call.
#define PGK_VECTOR_INLINE inline __attribute__((always_inline))

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// The type a row's sums of exps are kept and finished in: double for fp32 rows, else acc_t.
// In fp32 the lane holding the max (e = 1) rounds every later term to ulp(1) / 2, so sums
// whose rest beside that 1 matters (log s1 of a peaked row, s2 - 1 in the logit-gradient
// proxy, the KL of near-equal rows) would carry ~1e-7 absolute. The exps stay fp32.
template <typename acc_t>
using row_sum_t = std::conditional_t<std::is_same_v<acc_t, float>, double, acc_t>;

// Loops below step two vectors at a time; buffers are padded with -inf up to this multiple.
template <typename acc_t>
constexpr int64_t kStep = 2 * Vec<acc_t>::size();

template <typename acc_t>
constexpr int64_t kBufferSize = kChunk + kStep<acc_t>;

inline int64_t round_up(int64_t n, int64_t k) { return (n + k - 1) / k * k; }

// Where row r of a [..., V] tensor starts, for leading dims that collapse into at most two
// strided levels (e.g. logits[:, :-1] of a [B, T + 1, V] tensor): no copy of strided input.
struct RowLayout {
  int64_t n_inner;       // rows per outer step
  int64_t stride_outer;  // elements between outer steps
  int64_t stride_inner;  // elements between consecutive rows inside an outer step
  int64_t offset(int64_t r) const {
    return (r / n_inner) * stride_outer + (r % n_inner) * stride_inner;
  }
};

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// exp for fp32 lanes, ~1 ulp for the arguments these kernels use (x <= 0): Cody-Waite range
// reduction x = n ln2 + r with a two-part ln2, then Cephes' degree-6 polynomial for e^r.
// ATen's exp_u20 is as fast but ~15 ulp, which showed up as 3x the error of plain PyTorch in
// the gradients; Sleef's 1-ulp exp is ~1.6x slower. Results below ln(FLT_MIN) flush to 0; NaN
// stays NaN. AVX2 and AVX-512 give the same e^x bit for bit for x < 88.3 and -inf (the callers
// pass d <= 0 or -inf; +inf gives inf on AVX2, NaN on AVX-512).
PGK_VECTOR_INLINE Vec<float> exp_1ulp(const Vec<float>& v) {
  const Vec<float> lo(-87.33654475f);
#if defined(CPU_CAPABILITY_AVX512)
  // scalef takes any n: no clamp (two instructions of ~17) where 2^n is not built by hand.
  const Vec<float>& x = v;
#else
  // 2^n is built in the exponent field below: n must stay in [-126, 128].
  const Vec<float> x = at::vec::clamp(v, lo, Vec<float>(88.72283905f));
#endif
  const Vec<float> n = (x * Vec<float>(1.44269504088896341f)).round();
  Vec<float> r = at::vec::fnmadd(n, Vec<float>(0.693359375f), x);
  r = at::vec::fnmadd(n, Vec<float>(-2.12194440e-4f), r);
  Vec<float> p(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                        5.0000001201e-1f}) {
    p = at::vec::fmadd(p, r, Vec<float>(c));
  }
  const Vec<float> y = at::vec::fmadd(p, r * r, r) + Vec<float>(1.0f);
  // y 2^n, and 0 where v < lo.
#if defined(CPU_CAPABILITY_AVX512)
  // One masked scalef; a blendv on a vector mask cost two more instructions.
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(v, lo, _CMP_NLT_UQ), y, n);
#else
  const __m256i scale = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(scale)), _mm256_setzero_ps(),
                          _mm256_cmp_ps(v, lo, _CMP_LT_OQ));
#endif
}
#endif

// exp on a vector of the accumulation type: the CPU floor of these kernels is one exp per element.
template <typename acc_t>
PGK_VECTOR_INLINE Vec<acc_t> vexp(const Vec<acc_t>& x) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) return exp_1ulp(x);
#endif
  return x.exp();
}

// Sum of a vector's lanes in a fixed order (deterministic).
template <typename acc_t>
inline acc_t sum_lanes(const Vec<acc_t>& v) {
  constexpr int64_t W = Vec<acc_t>::size();
  acc_t lanes[W];
  v.store(lanes);
  acc_t s = 0;
  for (int64_t i = 0; i < W; ++i) s += lanes[i];
  return s;
}

// Per-lane sums of acc_t vectors, kept in row_sum_t<acc_t>: plain acc_t lanes, except fp32 rows
// on AVX2 and AVX-512, which sum each float vector in two double vectors (its low and high
// lanes, each element converted once). In fp32 the lane holding the max (e = 1) rounds each
// later term to ulp(1) / 2; the sums whose rest beside that 1 matters are kept this way:
//   - token_stats' s1: p at the argmax = 1 / s1 (max_prob, which the backward uses for log s1)
//     had 3.0e-7 relative error on peaked rows where PyTorch's cascade sum has 1.8e-7;
//   - its s2: the logit-gradient proxy (1 - p_c)^2 + (C - p_c^2) takes s2 - 1, the rest's sum of
//     e^2; on peaked rows (lgp 5e-9 .. 3e-6) it was up to 3x off, now 8e-8 relative at tau = 1
//     (plain fp32 PyTorch: 0.5 relative);
//   - the pair passes' s1_w, s1_v: the KL of near-equal rows.
template <typename acc_t>
struct WideLanes {
  Vec<acc_t> v{acc_t(0)};
  void add(const Vec<acc_t>& e) { v = v + e; }
  void add_square(const Vec<acc_t>& e) { v = at::vec::fmadd(e, e, v); }
  void scale(row_sum_t<acc_t> a) { v = Vec<acc_t>(acc_t(a)) * v; }
  WideLanes operator+(const WideLanes& o) const { return {v + o.v}; }
  Vec<acc_t> lanes() const { return v; }  // rounded to acc_t
  row_sum_t<acc_t> total() const { return sum_lanes(v); }
};

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The low and high halves of a float vector's lanes, converted to double.
PGK_VECTOR_INLINE Vec<double> low_half(const Vec<float>& e) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtps_pd(_mm512_castps512_ps256(e));
#else
  return _mm256_cvtps_pd(_mm256_castps256_ps128(e));
#endif
}
PGK_VECTOR_INLINE Vec<double> high_half(const Vec<float>& e) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
#else
  return _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1));
#endif
}
// The inverse: two double vectors rounded to one float vector.
PGK_VECTOR_INLINE Vec<float> join_halves(const Vec<double>& lo, const Vec<double>& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castpd_ps(_mm512_insertf64x4(
      _mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps(lo))),
      _mm256_castps_pd(_mm512_cvtpd_ps(hi)), 1));
#else
  return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
#endif
}

template <>
struct WideLanes<float> {
  Vec<double> lo{0.0}, hi{0.0};
  void add(const Vec<float>& e) {
    lo = lo + low_half(e);
    hi = hi + high_half(e);
  }
  void add_square(const Vec<float>& e) {  // e^2 formed in double
    const Vec<double> l = low_half(e), h = high_half(e);
    lo = at::vec::fmadd(l, l, lo);
    hi = at::vec::fmadd(h, h, hi);
  }
  void scale(double a) {
    const Vec<double> va(a);
    lo = va * lo;
    hi = va * hi;
  }
  WideLanes operator+(const WideLanes& o) const { return {lo + o.lo, hi + o.hi}; }
  Vec<float> lanes() const { return join_halves(lo, hi); }
  // Lanes in a fixed order (deterministic).
  double total() const {
    constexpr int64_t W = Vec<double>::size();
    alignas(64) double l[2 * W];
    lo.store(l);
    hi.store(l + W);
    double s = 0;
    for (int64_t i = 0; i < 2 * W; ++i) s += l[i];
    return s;
  }
};
#endif

template <typename acc_t>
inline bool is_finite(acc_t x) {
  return std::abs(x) < -neg_inf<acc_t>();
}

// The rows a backward writes without computing them, in one place for every op: an ignored row
// gets an exactly zero gradient, a row the forward left NaN (its saved normalizer not finite)
// gets NaN. Returns true when it wrote the row.
template <typename scalar_t>
inline bool fill_skipped_row(scalar_t* grad_row, int64_t V, bool ignored, bool nan_row) {
  if (!ignored && !nan_row) return false;
  const scalar_t value = ignored ? scalar_t(0) : scalar_t(std::numeric_limits<float>::quiet_NaN());
  std::fill(grad_row, grad_row + V, value);
  return true;
}

// Prefetches the next chunk of a row while this one computes, from the compute loop: each call
// covers the kSpan elements the loop's step consumes (every cache line of them, at least one
// prefetch: half a line of new data per step in bf16 and the W-step loops on AVX2, two lines
// per 2 W-step of fp32 on AVX-512). x is the row (V elements), begin the current chunk's start,
// i the loop's element offset in it. The compute loops read L1 chunk buffers only, so for the
// length of a chunk no load reaches the input stream and the hardware prefetchers stop running
// ahead: each chunk's load then waited on DRAM (load_chunk was 23 % of step_stats' forward at
// 256 x 32000 fp32 in perf, 10 % after). Spread over the loop it took that forward from 40-42
// to 30-31.5 ms (one thread, AVX2); the whole next chunk prefetched into L2 at once, right
// after the load, gained nothing measurable.
template <int64_t kSpan, typename scalar_t>
PGK_VECTOR_INLINE void prefetch_next_chunk(const scalar_t* x, int64_t begin, int64_t V,
                                           int64_t i) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);  // elements per cache line
  const int64_t next = begin + kChunk + i;
  for (int64_t j = 0; j < kSpan; j += kLine) {
    if (next + j < V) __builtin_prefetch(x + next + j, 0, 3);
  }
}

// x / tau of one vector, rounded once (quotient_rn: three FMA-class instructions with
// r = RN(1 / tau), no division); z = x (1 / tau) would round twice: up to ~|z| 2^-23 more error,
// which z - m near the max keeps.
template <typename acc_t>
inline Vec<acc_t> vquotient(const Vec<acc_t>& x, const Vec<acc_t>& vtau, const Vec<acc_t>& vr) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  const Vec<acc_t> q = x * vr;
  const Vec<acc_t> rem = at::vec::fmadd(q.neg(), vtau, x);
  // q itself where it is not finite (x = -inf, NaN, overflow): its residual is not finite.
  return Vec<acc_t>::blendv(q, at::vec::fmadd(rem, vr, q), (q - q) == Vec<acc_t>(acc_t(0)));
#else
  return x / vtau;  // the generic Vectorized fmadd is not fused
#endif
}

// The max over a vector's lanes (NaN if one is NaN).
template <typename acc_t>
inline acc_t lanes_max(const Vec<acc_t>& vmax) {
  constexpr int64_t W = Vec<acc_t>::size();
  acc_t lanes[W];
  vmax.store(lanes);
  acc_t m = lanes[0];
  for (int64_t i = 1; i < W; ++i) m = max_nan(m, lanes[i]);
  return m;
}

// buf[0, n) = src[0, n) in acc_t, buf[n, round_up(n, kStep)) = -inf. Returns the padded size.
template <typename scalar_t, typename acc_t>
inline int64_t copy_padded(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(src, src + n, buf);
  } else {
    at::vec::convert(src, buf, n);
  }
  const int64_t n_pad = round_up(n, kStep<acc_t>);
  std::fill(buf + n, buf + n_pad, neg_inf<acc_t>());
  return n_pad;
}

// The max of a chunk's vectors in four independent chains (NaN if one is NaN).
// at::vec::maximum propagates NaN through a compare and an OR on its chain, ~8 cycles per
// vector on Zen 4 (AVX-512): with one chain the loads below were bound by that latency, not by
// memory (~370 ns per 8 KiB fp32 chunk). Four chains took the fp32 forwards at 256 x 32000
// (one thread, AMD EPYC) from 14.5 to 10.3 ms (kl_divergence, two loads per chunk) and from
// 4.8 to 4.2 ms (token_stats); outputs bitwise the same (the max is exact in any order).
template <typename acc_t>
struct ChunkMax {
  Vec<acc_t> m0{neg_inf<acc_t>()}, m1{neg_inf<acc_t>()}, m2{neg_inf<acc_t>()},
      m3{neg_inf<acc_t>()};
  PGK_VECTOR_INLINE void add4(const Vec<acc_t>& a, const Vec<acc_t>& b, const Vec<acc_t>& c,
                              const Vec<acc_t>& d) {
    m0 = at::vec::maximum(m0, a);
    m1 = at::vec::maximum(m1, b);
    m2 = at::vec::maximum(m2, c);
    m3 = at::vec::maximum(m3, d);
  }
  PGK_VECTOR_INLINE void add2(const Vec<acc_t>& a, const Vec<acc_t>& b) {
    m0 = at::vec::maximum(m0, a);
    m1 = at::vec::maximum(m1, b);
  }
  PGK_VECTOR_INLINE void add(const Vec<acc_t>& a) { m0 = at::vec::maximum(m0, a); }
  acc_t total() const {
    return lanes_max(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
  }
};

// buf as copy_padded leaves it. Returns the chunk's max (NaN if the chunk holds a NaN). The max
// is taken as the chunk is converted, in the same loop (a separate pass over the buffer cost
// ~5-10 % of kl_divergence's forward, whose chunks are then shifted and divided in place).
template <typename scalar_t, typename acc_t>
inline acc_t load_chunk(const scalar_t* src, int64_t n, acc_t* buf) {
  constexpr int64_t W = Vec<acc_t>::size();
  ChunkMax<acc_t> max;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; i + 4 * W <= n; i += 4 * W) {
      const Vec<acc_t> a = Vec<acc_t>::loadu(src + i), b = Vec<acc_t>::loadu(src + i + W),
                       c = Vec<acc_t>::loadu(src + i + 2 * W),
                       d = Vec<acc_t>::loadu(src + i + 3 * W);
      a.store(buf + i);
      b.store(buf + i + W);
      c.store(buf + i + 2 * W);
      d.store(buf + i + 3 * W);
      max.add4(a, b, c, d);
    }
    for (; i + W <= n; i += W) {
      const Vec<acc_t> v = Vec<acc_t>::loadu(src + i);
      v.store(buf + i);
      max.add(v);
    }
  } else if constexpr (c10::is_reduced_floating_point_v<scalar_t> &&
                       std::is_same_v<acc_t, float>) {
    using Packed = at::vec::Vectorized<scalar_t>;  // 2 W 16-bit values
    for (; i + 4 * W <= n; i += 4 * W) {
      const auto [a, b] = at::vec::convert_to_float<scalar_t>(Packed::loadu(src + i));
      const auto [c, d] = at::vec::convert_to_float<scalar_t>(Packed::loadu(src + i + 2 * W));
      a.store(buf + i);
      b.store(buf + i + W);
      c.store(buf + i + 2 * W);
      d.store(buf + i + 3 * W);
      max.add4(a, b, c, d);
    }
    for (; i + 2 * W <= n; i += 2 * W) {
      const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Packed::loadu(src + i));
      lo.store(buf + i);
      hi.store(buf + i + W);
      max.add2(lo, hi);
    }
  }
  // The rest one by one, then the padding, up to round_up(n, kStep) exactly.
  for (int64_t j = i; j < n; ++j) buf[j] = acc_t(src[j]);
  const int64_t n_pad = round_up(n, kStep<acc_t>);
  std::fill(buf + n, buf + n_pad, neg_inf<acc_t>());
  for (; i < n_pad; i += W) max.add(Vec<acc_t>::loadu(buf + i));
  return max.total();  // propagates NaN
}

// buf[0, n) = src[0, n) / tau in acc_t, each quotient rounded once (vquotient),
// buf[n, round_up(n, kStep)) = -inf. Returns the chunk's max (NaN if the chunk holds a NaN).
template <typename scalar_t, typename acc_t>
inline acc_t load_quotient_chunk(const scalar_t* src, int64_t n, acc_t tau, acc_t r, acc_t* buf) {
  if (tau == acc_t(1)) return load_chunk(src, n, buf);  // nothing to scale
  constexpr int64_t W = Vec<acc_t>::size();
  const int64_t n_pad = copy_padded(src, n, buf);  // a multiple of kStep = 2 W
  const Vec<acc_t> vtau(tau), vr(r);
  ChunkMax<acc_t> max;
  for (int64_t i = 0; i < n_pad; i += 2 * W) {
    const Vec<acc_t> a = vquotient(Vec<acc_t>::loadu(buf + i), vtau, vr);
    const Vec<acc_t> b = vquotient(Vec<acc_t>::loadu(buf + i + W), vtau, vr);
    a.store(buf + i);
    b.store(buf + i + W);
    max.add2(a, b);
  }
  return max.total();
}

// A row's temperature and its reciprocal rounded once (quotient_rn's r).
template <typename acc_t>
struct Temperature {
  acc_t tau, r;
  acc_t divide(acc_t x) const { return quotient_rn(x, tau, r); }  // == vquotient
  // The scaled logit of a raw max xm, xm / tau, in row_sum_t (double for fp32 rows): the
  // reference of d = (x - xm) / tau (shift_divide_chunk) in the row's sums, accurate enough
  // that a difference of two references is (xm_old - xm_new) / tau to ~1e-16 relative.
  row_sum_t<acc_t> reference(acc_t xm) const {
    return row_sum_t<acc_t>(xm) / row_sum_t<acc_t>(tau);
  }
};

template <typename acc_t>
Temperature<acc_t> temperature(acc_t tau) {
  return {tau, acc_t(1) / tau};
}

// The shift of shift_divide_chunk for a side whose raw max so far is m: 0 while it has no
// finite entry, so that its d stays -inf (e = 0) rather than -inf - (-inf) = NaN. NaN / +inf
// pass through: the row is NaN.
template <typename acc_t>
inline acc_t finite_shift(acc_t m) {
  return m == neg_inf<acc_t>() ? acc_t(0) : m;
}

// The lanes of a comparison mask (all-ones or all-zeros lanes) as bits, lane i in bit i.
template <typename acc_t>
uint32_t lane_bits(const Vec<acc_t>& mask) {
  constexpr int64_t W = Vec<acc_t>::size();
  static_assert(W <= 32, "a mask's lanes must fit in 32 bits");
  acc_t lanes[W];
  mask.store(lanes);
  uint32_t bits = 0;
  for (int64_t i = 0; i < W; ++i) {
    bits |= uint32_t(lanes[i] != acc_t(0)) << i;  // an all-ones lane reads as NaN, != 0
  }
  return bits;
}

#if defined(CPU_CAPABILITY_AVX512)
template <>
inline uint32_t lane_bits(const Vec<float>& mask) {
  const __m512i m = _mm512_castps_si512(mask);
  return uint32_t(_mm512_test_epi32_mask(m, m));
}
template <>
inline uint32_t lane_bits(const Vec<double>& mask) {
  const __m512i m = _mm512_castpd_si512(mask);
  return uint32_t(_mm512_test_epi64_mask(m, m));
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
inline uint32_t lane_bits(const Vec<float>& mask) {
  return uint32_t(_mm256_movemask_ps(__m256(mask)));
}
template <>
inline uint32_t lane_bits(const Vec<double>& mask) {
  return uint32_t(_mm256_movemask_pd(__m256d(mask)));
}
#endif

template <typename acc_t>
bool all_lanes_set(const Vec<acc_t>& mask) {
  constexpr uint32_t kAll = uint32_t((uint64_t(1) << Vec<acc_t>::size()) - 1);
  return lane_bits(mask) == kAll;
}

template <typename acc_t>
bool any_lane_set(const Vec<acc_t>& mask) {
  return lane_bits(mask) != 0;
}

// The first index of value in buf[0, n) (n if none, NaN never found), as std::find, a vector
// at a time: a chunk holding a new row max looks it up, ~3 chunks of a random row, and the
// scalar search (~n / 2 compares each) was ~15 % of token_stats' forward outside its sweep.
template <typename acc_t>
int64_t find_first(const acc_t* buf, int64_t n, acc_t value) {
  constexpr int64_t W = Vec<acc_t>::size();
  const Vec<acc_t> v(value);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const uint32_t equal = lane_bits(Vec<acc_t>::loadu(buf + i) == v);
    if (equal != 0) return i + __builtin_ctz(equal);
  }
  for (; i < n; ++i) {
    if (buf[i] == value) return i;
  }
  return n;
}

// Whether d[0, n) holds no -inf (NaN counts as -inf). For a pair pass's v side (v_j = 0 nowhere):
// then the chunk's full vectors need none of pair_rows.h's pair_difference masking, d_w - d_v
// is the difference (PairLanes::add_exps). One min per vector over the L1-resident chunk, against
// five operations per vector and pair saved (or none: shift_divide_chunk<true>). The -inf
// padding past n is left to the masked path.
template <typename acc_t>
bool no_neg_inf(const acc_t* d, int64_t n) {
  constexpr int64_t W = Vec<acc_t>::size();
  Vec<acc_t> lo(-neg_inf<acc_t>()), hi(-neg_inf<acc_t>());
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    lo = at::vec::minimum(lo, Vec<acc_t>::loadu(d + i));
    hi = at::vec::minimum(hi, Vec<acc_t>::loadu(d + i + W));
  }
  acc_t lanes[W];
  at::vec::minimum(lo, hi).store(lanes);  // minimum propagates NaN
  bool ok = true;
  for (int64_t j = 0; j < W; ++j) ok = ok && lanes[j] > neg_inf<acc_t>();  // false for NaN
  for (; i < n; ++i) ok = ok && d[i] > neg_inf<acc_t>();
  return ok;
}

// buf[0, round_up(n, kStep)) = (buf - shift) / tau in place: the scaled logits relative to a
// raw max `shift`, d = z - m without forming z. The difference rounds once (exactly, for
// entries within a factor of 2 of the shift: Sterbenz) and the quotient once, so d carries
// ulp(d) / 2 where z - m from z = x / tau rounded carries ulp(z) / 2 from each of z and m
// (~1e-6 at |z| ~ 20 for fp32): near the max, where the probability mass is, d is then nearly
// exact. A -inf entry stays -inf (`shift`: finite_shift). kNoNegInf: also returns
// no_neg_inf(buf, n), checked in this pass (a second sweep of the chunk was ~5 % of
// step_stats' forward); else true.
template <bool kNoNegInf = false, typename acc_t>
inline bool shift_divide_chunk(acc_t* buf, int64_t n, const Temperature<acc_t>& tau, acc_t shift) {
  constexpr int64_t W = Vec<acc_t>::size();
  const int64_t n_pad = round_up(n, kStep<acc_t>);
  const int64_t n_full = kNoNegInf ? n / W * W : 0;  // whole vectors inside [0, n)
  const Vec<acc_t> vs(shift), vtau(tau.tau), vr(tau.r), ninf(neg_inf<acc_t>());
  // All-ones lanes while every d seen is > -inf (false for NaN): one compare per vector off the
  // chain and a one-cycle AND on it (a NaN-propagating min chain is ~3 dependent operations per
  // vector: kl_divergence / token_stats 2.0 -> 2.9).
  Vec<acc_t> ok(acc_t(0));
  ok = ok == ok;  // all ones
  int64_t i = 0;
  if (tau.tau == acc_t(1)) {
    if (shift == acc_t(0)) return !kNoNegInf || no_neg_inf(buf, n);  // nothing to shift
    for (; i < n_full; i += W) {
      const Vec<acc_t> d = Vec<acc_t>::loadu(buf + i) - vs;
      d.store(buf + i);
      ok = ok & (d > ninf);
    }
    for (; i < n_pad; i += W) (Vec<acc_t>::loadu(buf + i) - vs).store(buf + i);
  } else {
    for (; i < n_full; i += W) {
      const Vec<acc_t> d = vquotient(Vec<acc_t>::loadu(buf + i) - vs, vtau, vr);
      d.store(buf + i);
      ok = ok & (d > ninf);
    }
    for (; i < n_pad; i += W) vquotient(Vec<acc_t>::loadu(buf + i) - vs, vtau, vr).store(buf + i);
  }
  if constexpr (!kNoNegInf) return true;
  bool all = all_lanes_set(ok);
  for (int64_t j = n_full; j < n; ++j) all = all && buf[j] > neg_inf<acc_t>();
  return all;
}

// A chunk side's d (shift_divide_chunk's, from the raw logits x[0, n)) with each finite logit
// kept finite where the other side has no mass: under tau < 1 a huge finite fill (finfo.min,
// as Hugging Face masks) has (x - shift) / tau past the float range, -inf, a masked entry.
// Against the other side's finite entry a pair pass then read mass against none, KL +inf,
// where the float64 truth (a finite quotient) has no mass on either side there: a KL term of
// 0. Such entries become the lowest finite value. Where the other side has mass (`other_a`,
// `other_b`: the other sides' d over the same entries, if any, each moved by `to_a`, `to_b`
// into the frame where mass is judged; mass: d above exp_zero_below) the truth's term
// w_j |x| / tau lies beyond the lowest: the -inf stays, and the KL is +inf (the truth rounded
// to fp32 where w_j > ~0.3). Returns whether such an entry stayed -inf (its callers judge
// mass in the chunk's frame first, then, if one did, in the row's: `row_frame_shift`).
// Called for the sides of a chunk whose v side holds a -inf (`no_neg_inf`), so a pair pass
// over unmasked rows pays nothing. Not for fp64, whose truth overflows alike; at tau >= 1 only
// a shift above ~1e31 could overflow.
template <typename scalar_t, typename acc_t>
bool unmask_overflowed(acc_t* d, const scalar_t* x, int64_t n, const Temperature<acc_t>& tau,
                       const acc_t* other_a = nullptr, const acc_t* other_b = nullptr,
                       acc_t to_a = acc_t(0), acc_t to_b = acc_t(0)) {
  if constexpr (std::is_same_v<acc_t, double>) return false;
  if (!(tau.tau < acc_t(1))) return false;
  const auto massless = [](const acc_t* other, acc_t to, int64_t j) {
    return other == nullptr || !(other[j] + to > exp_zero_below<acc_t>());
  };
  bool kept = false;
  for (int64_t j = 0; j < n; ++j) {
    if (d[j] == neg_inf<acc_t>() && acc_t(x[j]) > neg_inf<acc_t>()) {
      if (massless(other_a, to_a, j) && massless(other_b, to_b, j)) {
        d[j] = std::numeric_limits<acc_t>::lowest();
      } else {
        kept = true;
      }
    }
  }
  return kept;
}

// The move of a side's d from its frame (relative to the raw max `frame_max`, as
// shift_divide_chunk formed them) to its whole row's (x[0, V), raw), <= 0: where
// unmask_overflowed judges the other side's mass once the chunk's own frame kept a -inf. A
// logit of 10 against a finfo.min fill, its row's max of 20 in another chunk, tau 0.05: its
// w_j is e^-200 in the row, 1 in its chunk, and the KL read +inf for 57.7. Reads the row
// (rare: a fill past the range against mass in the chunk's frame); `row_max` caches the max
// (NaN: not read yet).
template <typename scalar_t, typename acc_t>
acc_t row_frame_shift(const scalar_t* x, int64_t V, acc_t frame_max,
                      const Temperature<acc_t>& tau, acc_t& row_max) {
  if (std::isnan(row_max)) {
    row_max = neg_inf<acc_t>();
    for (int64_t j = 0; j < V; ++j) row_max = std::max(row_max, acc_t(x[j]));
  }
  return tau.divide(finite_shift(frame_max) - finite_shift(row_max));
}

// Per-row temperature: a per-row tensor when given, else the scalar (rounded to acc_t). A
// per-row value that is not finite and > 0 (Python checks the tensor only outside
// torch.compile) maps to NaN: a NaN row, as the Triton and CUDA kernels give.
template <typename acc_t>
struct RowTemperature {
  const acc_t* per_row;  // nullptr when the temperature is a scalar
  acc_t scalar;
  Temperature<acc_t> operator()(int64_t r) const {
    const acc_t t = per_row ? per_row[r] : scalar;
    return temperature(t > acc_t(0) && t < -neg_inf<acc_t>() ? t : quiet_nan<acc_t>());
  }
};

// Rows per parallel task: about 32 Ki elements, so small vocabularies do not pay a task per row.
inline int64_t grain_rows(int64_t V) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(V, 1));
}

}  // namespace pg_kernels::cpu
