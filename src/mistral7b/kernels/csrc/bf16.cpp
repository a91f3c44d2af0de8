// Decode over bfloat16 weights (quant/layers.py BF16Linear, a bf16 model on the CPU):
// y = x @ W^T for a bf16 weight (N, K) as stored (row-major, untouched) and T <= 4 bf16
// activation rows: decode is a stream over W, and `vdpbf16ps` multiplies 32 bf16 pairs into
// 16 float32 lanes per instruction. R weight rows at a time share each activation load; the
// R * T sums are independent chains, reduced across lanes once per row at the end.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "kernels.h"

#if M7_X86
#include <immintrin.h>
#endif

namespace {

bool cpu_has_bf16() {
#if M7_X86
  // (not where MISTRAL7B_ISA=avx2 asks for AVX2 alone)
  if (mistral7b::isa() != mistral7b::Isa::kAvx512) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

#if M7_X86

#define M7_TARGET_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

template <int R, int T>
M7_TARGET_BF16 void bf16_rows(const at::BFloat16* w, const at::BFloat16* x, int64_t K,
                              at::BFloat16* y, int64_t N) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh xv[T];
    for (int t = 0; t < T; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(x + t * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * K + k);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) y[t * N + r] = at::BFloat16(_mm512_reduce_add_ps(acc[r][t]));
}

template <int T>
void bf16_gemv_t(const at::BFloat16* w, const at::BFloat16* x, int64_t N, int64_t K,
                 at::BFloat16* y) {
  constexpr int64_t kR = 8;
  at::parallel_for(0, (N + kR - 1) / kR, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * kR;
      if (n + kR <= N) {
        bf16_rows<kR, T>(w + n * K, x, K, y + n, N);
      } else {
        for (int64_t i = n; i < N; ++i) bf16_rows<1, T>(w + i * K, x, K, y + i, N);
      }
    }
  });
}

#endif  // M7_X86

bool has_bf16() { return cpu_has_bf16(); }

// x (M, K) bf16 with M <= 4, w (N, K) bf16, both contiguous, K a multiple of 32 -> (M, N) bf16
// (float32 sums, one rounding).
at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(cpu_has_bf16(), "mistral7b bf16_gemv needs a CPU with AVX-512 BF16");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.scalar_type() == at::kBFloat16 &&
                  w.scalar_type() == at::kBFloat16 && x.is_contiguous() && w.is_contiguous(),
              "x and w must be contiguous 2-D bfloat16 tensors");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && K % 32 == 0, "w must be (N, K) with K a multiple of 32");
  TORCH_CHECK(M >= 1 && M <= 4, "bf16_gemv takes 1 to 4 rows, got ", M);
  at::Tensor y = at::empty({M, N}, x.options());
#if M7_X86
  const auto* wp = w.data_ptr<at::BFloat16>();
  const auto* xp = x.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  switch (M) {
    case 1: bf16_gemv_t<1>(wp, xp, N, K, yp); break;
    case 2: bf16_gemv_t<2>(wp, xp, N, K, yp); break;
    case 3: bf16_gemv_t<3>(wp, xp, N, K, yp); break;
    default: bf16_gemv_t<4>(wp, xp, N, K, yp);
  }
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mistral7b_qmm, m) {
  m.def("has_bf16() -> bool", &has_bf16);
  m.def("bf16_gemv(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistral7b_qmm, CPU, m) { m.impl("bf16_gemv", &bf16_gemv); }
