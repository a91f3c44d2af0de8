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

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define ATT_TARGET __attribute__((target("avx512f,avx512dq,fma")))
#endif

namespace {

#if defined(__x86_64__)

// 16 keys' or values' elements as float32: the pool holds float32, or bfloat16 (float32's top
// half: widening is exact)
ATT_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

ATT_TARGET inline __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename E>
ATT_TARGET inline float dot(const float* a, const E* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

template <typename E>
ATT_TARGET inline void axpy(float alpha, const E* x, float* y, int64_t n) {
  const __m512 va = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, load16(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * static_cast<float>(x[i]);
}

// e^x for x <= 0: 2^n e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts)
ATT_TARGET inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// s[0..n) <- exp(s - max); returns their sum
ATT_TARGET float softmax_numerators(float* s, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  const __m512 vmax = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmax));
    _mm512_storeu_ps(s + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (j < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vmax));
    _mm512_mask_storeu_ps(s + j, m, e);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, e));
  }
  return _mm512_reduce_add_ps(acc);
}

// one row's kv head: G query heads (q, out: G x Dh), keys/values at `slots` of kh / vh
template <typename E>
ATT_TARGET void attend_group(const float* q, const E* kh, const E* vh,
                             const int64_t* slots, int64_t n, int64_t G, int64_t Dh,
                             float scale, float* s, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const E* kr = kh + slots[j] * Dh;
    for (int64_t g = 0; g < G; ++g) s[g * n + j] = dot(q + g * Dh, kr, Dh) * scale;
  }
  std::fill(out, out + G * Dh, 0.0f);
  std::vector<float> inv(G);
  for (int64_t g = 0; g < G; ++g) inv[g] = n ? 1.0f / softmax_numerators(s + g * n, n) : 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const E* vr = vh + slots[j] * Dh;
    for (int64_t g = 0; g < G; ++g) axpy(s[g * n + j] * inv[g], vr, out + g * Dh, Dh);
  }
}

#endif

}  // namespace

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
#if defined(__x86_64__)
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto attend = [&](auto* kp, auto* vp) {
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
    attend(k.data_ptr<float>(), v.data_ptr<float>());
  else
    attend(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
#else
  TORCH_CHECK(false, "paged_attention runs on x86-64 only");
#endif
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
