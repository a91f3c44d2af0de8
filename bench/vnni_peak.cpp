// The ceiling for our int8 products on this CPU: independent `vpdpbusd` (64 int8 multiply-adds
// each) in registers, no memory, on every OpenMP thread. GOP/s counts a multiply-add as two.
//
//   g++ -O2 -mavx512f -mavx512bw -mavx512vnni -fopenmp bench/vnni_peak.cpp -o /tmp/vnni_peak
//   OMP_NUM_THREADS=2 /tmp/vnni_peak
#include <immintrin.h>
#include <omp.h>

#include <cstdio>

#define DOT(acc) acc = _mm512_dpbusd_epi32(acc, a, b);

int main() {
  const long total = 4000000000L;  // instructions, shared out over the threads
  const double t0 = omp_get_wtime();
  long check = 0;
#pragma omp parallel reduction(+ : check)
  {
    __m512i s0 = _mm512_set1_epi32(1), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0,
            s7 = s0, s8 = s0, s9 = s0;
    const __m512i a = _mm512_set1_epi8(static_cast<char>(omp_get_thread_num() + 3));
    const __m512i b = _mm512_set1_epi8(5);
    const long n = total / 10 / omp_get_num_threads();
    for (long i = 0; i < n; ++i) {
      // ten independent chains: the latency (~4-5 cycles) hidden, throughput measured
      DOT(s0) DOT(s1) DOT(s2) DOT(s3) DOT(s4) DOT(s5) DOT(s6) DOT(s7) DOT(s8) DOT(s9)
      __asm__ volatile("" : "+v"(s0), "+v"(s1), "+v"(s2), "+v"(s3), "+v"(s4), "+v"(s5),
                       "+v"(s6), "+v"(s7), "+v"(s8), "+v"(s9));
    }
    __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3)),
                                 _mm512_add_epi32(_mm512_add_epi32(s4, s5), _mm512_add_epi32(s6, s7)));
    check += _mm512_reduce_add_epi32(_mm512_add_epi32(s, _mm512_add_epi32(s8, s9)));
  }
  const double dt = omp_get_wtime() - t0;
  std::printf("%d threads: %ld vpdpbusd in %.3f s = %.0f GOP/s (check %ld)\n",
              omp_get_max_threads(), total, dt, total * 64.0 * 2 / dt / 1e9, check);
  return 0;
}
