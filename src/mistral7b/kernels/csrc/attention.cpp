// Decode attention straight from the paged KV pool: one query token per row, its keys named by
// slot (cache.py's layout: a layer's k and v are (KV, S, Dh)), no gathered copy of the keys.
//
//   out[b, i] = sum_j p_j v[slot_j],  p = softmax_j(q[b, i] . k[slot_j] / sqrt(Dh))
//
// over the keys j that row b sees: slots gather[b, j] where mask[b, j] (gather None: the slots
// start .. stop-1 for every row; mask None: every key). A row is one query token. Query head i uses kv head i / G, so
// one task takes a row's kv head and its G query heads and reads each key and value once.
// Scores, exponentials and sums are float32; exp is a degree-6 polynomial after range
// reduction (relative error ~2e-7). Model.py's decode steps and the fused step (step.cpp)
// both call this one function, so the two give the same numbers.

#include "kernels.h"  // (first: it sets M7_PRIMARY)
#if M7_PRIMARY
#include <ATen/ATen.h>
#include <torch/library.h>
#endif
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>


#include "simd.h"

namespace M7_NS {

template <typename E>
M7_TARGET inline void axpy(float alpha, const E* x, float* y, int64_t n) {
  const VF va = f_set1(alpha);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    f_store(y + i, f_fmadd(va, f_load(x + i), f_load(y + i)));
  for (; i < n; ++i) y[i] += alpha * static_cast<float>(x[i]);
}

// e^x for x <= 0: 2^n e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts)
M7_TARGET inline VF vexp(VF x) {
  x = f_max(x, f_set1(-87.0f));
  const VF n = f_round(f_mul(x, f_set1(1.44269504088896341f)));
  VF r = f_fnmadd(n, f_set1(0.693145751953125f), x);
  r = f_fnmadd(n, f_set1(1.428606765330187e-06f), r);
  VF p = f_set1(1.0f / 720);
  p = f_fmadd(p, r, f_set1(1.0f / 120));
  p = f_fmadd(p, r, f_set1(1.0f / 24));
  p = f_fmadd(p, r, f_set1(1.0f / 6));
  p = f_fmadd(p, r, f_set1(0.5f));
  p = f_fmadd(p, r, f_set1(1.0f));
  p = f_fmadd(p, r, f_set1(1.0f));
  return f_scale2(p, n);
}

// s[0..n) <- exp(s - max); returns their sum
M7_TARGET float softmax_numerators(float* s, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  const VF vmax = f_set1(mx);
  VF acc[kWide];
  for (int c = 0; c < kWide; ++c) acc[c] = f_zero();
  for (int64_t j = 0; j < n; j += 16) {
    for (int c = 0; c < kWide; ++c) {
      const int64_t at = j + c * kLanes;
      const int rest = static_cast<int>(std::min<int64_t>(kLanes, std::max<int64_t>(0, n - at)));
      if (rest == kLanes) {
        const VF e = vexp(f_sub(f_load(s + at), vmax));
        f_store(s + at, e);
        acc[c] = f_add(acc[c], e);
      } else if (rest > 0) {   // the tail: its lanes past n add zeros
        const VF e = vexp(f_sub(f_load_first(s + at, rest), vmax));
        f_store_first(s + at, e, rest);
        acc[c] = f_add(acc[c], f_first(e, rest));
      }
    }
  }
  return f_sum16(acc);
}

// one row's kv head: G query heads (q, out: G x Dh), keys/values at `slots` of kh / vh
template <typename E>
M7_TARGET void attend_group(const float* q, const E* kh, const E* vh,
                             const int64_t* slots, int64_t n, int64_t G, int64_t Dh,
                             float scale, float* s, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const E* kr = kh + slots[j] * Dh;
    for (int64_t g = 0; g < G; ++g) s[g * n + j] = f_dot(q + g * Dh, kr, Dh) * scale;
  }
  std::fill(out, out + G * Dh, 0.0f);
  std::vector<float> inv(G);
  for (int64_t g = 0; g < G; ++g) inv[g] = n ? 1.0f / softmax_numerators(s + g * n, n) : 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const E* vr = vh + slots[j] * Dh;
    for (int64_t g = 0; g < G; ++g) axpy(s[g * n + j] * inv[g], vr, out + g * Dh, Dh);
  }
}

// every row's kv heads: q (B, H, Dh) float32, k / v one layer of the pool, `slots` (B, K),
// `visible` (B, K) or null; out (B, H * Dh)
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* sp,
            int64_t K, const bool* mp, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), KV = k.size(0), S = k.size(1);
  const int64_t G = H / KV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto run = [&](auto* kp, auto* vp) {
    at::parallel_for(0, B * KV, 1, [&](int64_t t0, int64_t t1) {
      std::vector<int64_t> seen(K);
      std::vector<float> s(G * K);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / KV, h = t % KV;
        int64_t n = 0;
        for (int64_t j = 0; j < K; ++j)
          if (!mp || mp[b * K + j]) seen[n++] = sp[b * K + j];
        attend_group(qp + (b * H + h * G) * Dh, kp + h * S * Dh, vp + h * S * Dh, seen.data(),
                     n, G, Dh, scale, s.data(), op + (b * H + h * G) * Dh);
      }
    });
  };
  if (k.scalar_type() == at::kFloat)
    run(k.data_ptr<float>(), v.data_ptr<float>());
  else
    run(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
}

}  // namespace M7_NS

#if M7_PRIMARY
namespace mistral7b {

// q (B, H, Dh) float32; k, v (KV, S, Dh) contiguous, float32 or bfloat16 (one layer of the
// pool; the sums are float32 either way). Returns (B, H * Dh) float32.
at::Tensor paged_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& gather, int64_t start, int64_t stop,
                           const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q_in.dim() == 3 && q_in.scalar_type() == at::kFloat, "q must be (B, H, Dh) float32");
  TORCH_CHECK(k.dim() == 3 && k.is_contiguous() && v.is_contiguous() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16) &&
                  v.scalar_type() == k.scalar_type() && v.sizes() == k.sizes(),
              "k and v must be contiguous float32 or bfloat16 (KV, S, Dh)");
  const at::Tensor q = q_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), KV = k.size(0), S = k.size(1);
  TORCH_CHECK(k.size(2) == Dh && H % KV == 0, "q and k disagree on head_dim or heads");
  const int64_t G = H / KV;
  at::Tensor slots;
  if (gather.has_value()) {
    TORCH_CHECK(gather->dim() == 2 && gather->size(0) == B, "gather must be (B, K)");
    slots = gather->to(at::kLong).contiguous();
  } else {
    TORCH_CHECK(0 <= start && start < stop && stop <= S,
                "without gather: a slot range [start, stop) inside the pool");
    slots = at::arange(start, stop, at::kLong).view({1, -1}).expand({B, -1}).contiguous();
  }
  const int64_t K = slots.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * K; ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < S, "slot out of range");
  at::Tensor vis;
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == K,
                "mask must be (B, K)");
    vis = mask->to(at::kBool).contiguous();
  }
  const bool* mp = vis.defined() ? vis.data_ptr<bool>() : nullptr;
  at::Tensor out = at::empty({B, H * Dh}, q.options());
  check_isa("paged_attention");
  M7_ON_ISA(attend(q, k, v, sp, K, mp, out));
  return out;
}

}  // namespace mistral7b

TORCH_LIBRARY_FRAGMENT(mistral7b_qmm, m) {
  m.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor? gather, int start, int stop, "
        "Tensor? mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistral7b_qmm, CPU, m) {
  m.impl("paged_attention", &mistral7b::paged_attention);
}

#endif  // M7_PRIMARY
