// RMSNorm in float32 with a fixed order of operations, for model.py's eager layers and the
// fused step (step.cpp) alike, so both give the same bits:
//
//   y = (x * r) * w,   r = 1 / sqrt(sum(x^2) / D + eps)
//
// the sum of squares taken in 16 lanes (fused multiply-adds; AVX2's two registers of 8),
// then across the lanes (simd.h f_sum16), then the tail of D % 16 values one by one.

#include "kernels.h"  // (first: it sets M7_PRIMARY)
#if M7_PRIMARY
#include <ATen/ATen.h>
#include <torch/library.h>
#endif
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>


#include "simd.h"

namespace M7_NS {

M7_TARGET void norm_row(const float* x, const float* w, float* y, int64_t D, float eps) {
  const float ss = f_dot(x, x, D);
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
  const VF vr = f_set1(r);
  int64_t i = 0;
  for (; i + kLanes <= D; i += kLanes)
    f_store(y + i, f_mul(f_mul(f_load(x + i), vr), f_load(w + i)));
  for (; i < D; ++i) {
    const float xr = x[i] * r;
    y[i] = xr * w[i];
  }
}
void rms_norm_rows(const float* x, const float* w, float* y, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) norm_row(x + r * D, w, y + r * D, D, eps);
  });
}

}  // namespace M7_NS

#if M7_PRIMARY
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
  check_isa("rms_norm");
  M7_ON_ISA(rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, D,
                          static_cast<float>(eps)));
  return y;
}

}  // namespace mistral7b

TORCH_LIBRARY_FRAGMENT(mistral7b_qmm, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistral7b_qmm, CPU, m) { m.impl("rms_norm", &mistral7b::rms_norm); }

#endif  // M7_PRIMARY
