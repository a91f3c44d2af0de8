// RMSNorm in float32 with a fixed order of operations, for model.py's eager layers and the
// fused step (step.cpp) alike, so both give the same bits:
//
//   y = (x * r) * w,   r = 1 / sqrt(sum(x^2) / D + eps)
//
// the sum of squares taken in 16 lanes (fused multiply-adds), then across the lanes, then the
// tail of D % 16 values one by one.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define NORM_TARGET __attribute__((target("avx512f,avx512dq,fma")))
#endif

namespace {

#if defined(__x86_64__)
NORM_TARGET void norm_row(const float* x, const float* w, float* y, int64_t D, float eps) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  float ss = _mm512_reduce_add_ps(acc);
  for (; i < D; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
  const __m512 vr = _mm512_set1_ps(r);
  for (i = 0; i + 16 <= D; i += 16)
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vr),
                                          _mm512_loadu_ps(w + i)));
  for (; i < D; ++i) {
    const float xr = x[i] * r;
    y[i] = xr * w[i];
  }
}
#endif

}  // namespace

namespace mistral7b {

// x (..., D) float32, w (D,) float32 -> (..., D)
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat,
              "rms_norm takes float32 x and weight");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(w_in.numel() == D, "rms_norm: the weight must have ", D, " values");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t rows = D ? x.numel() / D : 0;
#if defined(__x86_64__)
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      norm_row(xp + r * D, wp, yp + r * D, D, static_cast<float>(eps));
  });
#else
  TORCH_CHECK(false, "rms_norm runs on x86-64 only");
#endif
  return y;
}

}  // namespace mistral7b

TORCH_LIBRARY_FRAGMENT(mistral7b_qmm, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistral7b_qmm, CPU, m) { m.impl("rms_norm", &mistral7b::rms_norm); }
