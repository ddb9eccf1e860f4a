// FMA throughput of 256-bit (AVX2) against 512-bit (AVX-512) vectors on this CPU: whether
// AVX-512 doubles the floating-point work per cycle (two 512-bit FMA units) or runs each
// 512-bit FMA as two 256-bit halves (AMD Zen 4), which decides what a loop bound by
// floating-point throughput (step_stats' fused row on a CPU) can gain from the AVX-512 build.
//
//   g++ -O2 -mavx512f -mfma -o /tmp/fma_width benchmarks/fma_width.cpp && /tmp/fma_width
//
// Twelve independent chains per width (more than latency x units), best of five runs.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

template <class F>
double seconds(F f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int main() {
  constexpr long kIters = 200000000;
  constexpr int kChains = 12;
  float sink = 0;
  double t256 = 1e30, t512 = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    t256 = std::min(t256, seconds([&] {
      __m256 a[kChains];
      for (int k = 0; k < kChains; ++k) a[k] = _mm256_set1_ps(1.0f + k * 1e-7f);
      const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
      for (long i = 0; i < kIters; ++i)
        for (int k = 0; k < kChains; ++k) a[k] = _mm256_fmadd_ps(a[k], m, c);
      for (int k = 0; k < kChains; ++k) sink += _mm256_cvtss_f32(a[k]);
    }));
    t512 = std::min(t512, seconds([&] {
      __m512 a[kChains];
      for (int k = 0; k < kChains; ++k) a[k] = _mm512_set1_ps(1.0f + k * 1e-7f);
      const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
      for (long i = 0; i < kIters; ++i)
        for (int k = 0; k < kChains; ++k) a[k] = _mm512_fmadd_ps(a[k], m, c);
      for (int k = 0; k < kChains; ++k) sink += _mm512_cvtss_f32(a[k]);
    }));
  }
  const double n = double(kIters) * kChains;
  std::printf("256-bit FMA: %.2f G instructions/s, %.1f GFLOP/s\n", n / t256 / 1e9,
              n * 16 / t256 / 1e9);
  std::printf("512-bit FMA: %.2f G instructions/s, %.1f GFLOP/s\n", n / t512 / 1e9,
              n * 32 / t512 / 1e9);
  std::printf("512 / 256 floating-point throughput: %.2f (checksum %g)\n", t256 * 2 / t512, sink);
  return 0;
}
