// ggml's K-quants (Q4_K, Q5_K, Q6_K: what a Q4_K_M or Q5_K_M file holds) on their own bits:
// y = x @ W^T over their panels (kqmm), with the activations quantized to int8 with one scale
// per super-block of 256 inputs (ggml's Q8_K, as llama.cpp does for K-quants; qmm.cpp's
// quantize_acts with span 256); kpack.cpp repacks GGUF blocks into those panels (gguf_kpanels).
//
// GGUF super-blocks of 256 values, per row (ggml's k_quants, gguf-py's dequantizer):
//
//   Q4_K  144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit (sc, m) for 8 sub-blocks of 32,
//         128 bytes of nibbles                                 w = d sc q - dmin m, q 0..15
//   Q5_K  176 bytes: as Q4_K, then 32 bytes of high bits before the nibbles: value i's
//         fifth bit is bit (i / 32) of qh[i % 32]              w = d sc q - dmin m, q 0..31
//   Q6_K  210 bytes: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales (one per
//         16 values), f16 d                                    w = d sc (q - 32), q 0..63
//
// Our layout keeps those bits, nothing widened: per panel of 16 rows and block b of 32
// inputs, BITS x 64 bytes. The first 4 chunks hold the low nibbles exactly as qmm.cpp's 4-bit
// panels do (register i = 0..7 after unpacking pairs with activation bytes 4(i/2) + t, plus
// 16 for odd i); the next BITS - 4 chunks hold the top bits of the block's value 4k + t
// (k = 0..7) in byte t of lane r: Q5_K bit k of chunk 4, Q6_K bits 2(k%4), 2(k%4)+1 of chunk
// 4 + k/4, so that the repack moves whole 32-bit words (put_block). The sub-block scales
// are the file's bytes too, stored [panel][super-block][byte][16 rows]: Q6_K's 16 int8
// scales, Q4_K / Q5_K's 12 bytes of packed 6-bit (sc, m) pairs (unpacked per block in the
// kernel, ggml's get_scale_min_k4); the float16 d (and dmin) [panel][super-block][16 rows].
// So a weight takes the file's 4.5, 5.5 and 6.5625 bits, no more.
//
// Per super-block s of one output row, with activation scale a_s, and per 32-block b in it
// int8 values v, their 16-value sums s16 and sg_b = a_s (sum v):
//   Q4_K/Q5_K  a_s sum_b (d sc_b) (sum q v)  -  sum_b (dmin m_b) sg_b
//   Q6_K       a_s sum_b ((d sc_lo) (sum_lo q v - 32 s16_lo) + (d sc_hi) (sum_hi ... ))
// the brackets exact in int32, the factors (d sc) exact in float32, the rest float32. A
// block of a row costs a conversion and one accumulation (Q4_K / Q5_K a second for the min)
// beside its 8 `vpdpbusd`; the scale per 256 saves the multiply by a scale per block, float
// work that bounded pre-fill (best of four at 256 rows: 1.23-1.37x, bench/bench_kernels.py;
// the README's seventh-pass section has the figures and what the rounding costs). Two
// float accumulators per row (the super-block's part, the total) and 16 outputs is all a
// tile of rows keeps in registers, beside the block's 8 registers of values: tiles of 8 rows
// fit AVX-512's 32 registers, 4 AVX2's 16 (simd.h kMaxTile), as in qmm.cpp.

#include "kernels.h"  // (first: it sets M7_PRIMARY)
#if M7_PRIMARY
#include <ATen/ATen.h>
#include <torch/library.h>
#endif
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace M7_NS {

constexpr int64_t kBlock = mistral7b::kBlockInputs;
constexpr int64_t kRows = mistral7b::kPanelRows;
constexpr int64_t kSuper = mistral7b::kSuperInputs;

template <int BITS>
M7_TARGET inline void unpack(const uint8_t* wb, VI wv[8]) {
  unpack_nibbles(wb, wv);
  // register i holds value 4k + t of the block, k = 4 (i % 2) + i / 2 (qmm.cpp's pairing)
  if constexpr (BITS == 5) {
    // bit k of each byte to bit 4 (16-bit shifts: the mask drops what crosses bytes)
    const VI h = i_load(wb + 256), bit4 = i_set1_8(0x10);
    for (int i = 0; i < 8; ++i) {
      const int k = 4 * (i % 2) + i / 2;
      const VI moved = k <= 4 ? i_sll16(h, 4 - k) : i_srl16(h, k - 4);
      wv[i] = i_or(wv[i], i_and(moved, bit4));
    }
  } else if constexpr (BITS == 6) {
    // bits 2 (k % 4), + 1 of chunk 4 + k / 4 to bits 4, 5; k / 4 = i % 2, k % 4 = i / 2
    const VI h0 = i_load(wb + 256), h1 = i_load(wb + 320);
    const VI bits45 = i_set1_8(0x30);
    for (int i = 0; i < 8; ++i) {
      const VI h = i % 2 ? h1 : h0;
      const int at = 2 * (i / 2);
      const VI moved = at <= 4 ? i_sll16(h, 4 - at) : i_srl16(h, at - 4);
      wv[i] = i_or(wv[i], i_and(moved, bits45));
    }
  }
}

// Sub-block j's 6-bit scales and mins of the panel's 16 rows, a register per part, from a
// super-block's 12 packed bytes (each 16 rows wide): get_scale_min_k4 on 16 lanes.
M7_TARGET inline void scale_min(const uint8_t* packed, int j, VF sc[kParts], VF mn[kParts]) {
  const auto at = [&](int i) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + 16 * i)); };
  const __m128i six = _mm_set1_epi8(63), low4 = _mm_set1_epi8(0x0F), top2 = _mm_set1_epi8(-64);
  __m128i s, m;
  if (j < 4) {
    s = _mm_and_si128(at(j), six);
    m = _mm_and_si128(at(j + 4), six);
  } else {  // low 4 bits from byte j + 4, top 2 from the top bits of bytes j - 4 / j
    const __m128i c = at(j + 4);
    s = _mm_or_si128(_mm_and_si128(c, low4), _mm_srli_epi16(_mm_and_si128(at(j - 4), top2), 2));
    m = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(c, 4), low4),
                     _mm_srli_epi16(_mm_and_si128(at(j), top2), 2));
  }
  sc[0] = f_from_u8(s);
  mn[0] = f_from_u8(m);
  if constexpr (kParts == 2) {  // AVX2's second 8 rows
    sc[1] = f_from_u8(_mm_srli_si128(s, 8));
    mn[1] = f_from_u8(_mm_srli_si128(m, 8));
  }
}

// Block b's two vectors of float factors for the parts `first` .. first + N - 1 of the panel
// (one register of rows each): Q4_K / Q5_K d sc and dmin m of its sub-block, Q6_K d sc of
// its two halves; dv and dmv are its super-block's d and dmin, per part. Each factor is exact
// in float32 (an 11-bit float16 mantissa times a 6- or 8-bit integer), so folding d in here
// rounds nothing.
template <int BITS, int64_t N>
M7_TARGET inline void block_factors(const uint8_t* sc, const VF* dv, const VF* dmv, int64_t b,
                                    int64_t first, VF* f0, VF* f1) {
  if constexpr (BITS == 6) {
    for (int64_t h = 0; h < N; ++h) {
      const int64_t r0 = (first + h) * kLanes;
      f0[h] = f_mul(dv[h], f_from_i8(sc + 2 * b * kRows + r0));
      f1[h] = f_mul(dv[h], f_from_i8(sc + (2 * b + 1) * kRows + r0));
    }
  } else {  // the packed bytes unpacked once for all the panel's rows
    VF scv[kParts], mv[kParts];
    scale_min(sc + b / 8 * 12 * kRows, static_cast<int>(b % 8), scv, mv);
    for (int64_t h = 0; h < N; ++h) {
      f0[h] = f_mul(dv[h], scv[first + h]);
      f1[h] = f_mul(dmv[h], mv[first + h]);
    }
  }
}

// Super-block s's d and dmin (Q6_K: d twice) for the parts `first` .. first + N - 1.
template <int BITS, int64_t N>
M7_TARGET inline void super_factors(const at::Half* d, const at::Half* dmin, int64_t s,
                                    int64_t first, VF* dv, VF* dmv) {
  for (int64_t h = 0; h < N; ++h) {
    const int64_t r0 = (first + h) * kLanes;
    dv[h] = f_load(d + s * kRows + r0);
    dmv[h] = BITS == 6 ? dv[h] : f_load(dmin + s * kRows + r0);
  }
}

// A panel's every block's factors, computed once for many row tiles (pre-fill): block b's
// at out[32 b] and out[32 b + 16].
template <int BITS>
M7_TARGET void unpack_factors(const uint8_t* sc, const at::Half* d, const at::Half* dmin,
                              int64_t nb, float* out) {
  VF dv[kParts], dmv[kParts];
  for (int64_t b = 0; b < nb; ++b) {
    VF f0[kParts], f1[kParts];
    if (b % 8 == 0) super_factors<BITS, kParts>(d, dmin, b / 8, 0, dv, dmv);
    block_factors<BITS, kParts>(sc, dv, dmv, b, 0, f0, f1);
    for (int64_t part = 0; part < kParts; ++part) {
      f_store(out + 32 * b + part * kLanes, f0[part]);
      f_store(out + 32 * b + 16 + part * kLanes, f1[part]);
    }
  }
}

// Whether pre-fill unpacks a panel's values once into memory (kspan): Q5_K / Q6_K (their top
// bits cost more to place than loading them back does), not Q4_K (kpanel then never reads
// `values`, and knows it at compile time: as a run-time null Q4_K's tile ran 14% slower).
template <int BITS>
constexpr bool kUnpackOnce = BITS != 4;

// A panel's every block unpacked once for many row tiles (pre-fill): block b's 8 registers of
// values at out + 512 b, as `unpack` gives them.
template <int BITS>
M7_TARGET void unpack_values(const uint8_t* w, int64_t nb, uint8_t* out) {
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t r0 = 0; r0 < kRows; r0 += kLanes) {
      VI wv[8];
      unpack<BITS>(w + b * BITS * 64 + 4 * r0, wv);
      for (int i = 0; i < 8; ++i) i_store(out + 512 * b + 64 * i + 4 * r0, wv[i]);
    }
  }
}

// One panel (16 output rows) times a tile of T activation rows; pointers at the panel's own
// data and the tile's (ActBlocks). `values` and `factors`: the panel's values (unpack_values)
// and block factors (unpack_factors) computed beforehand, each or null (then computed here
// from `w`, or `sc`, `d`, `dmin`); either way each row's arithmetic is the same, whatever T.
// `stream`: `w` comes from memory, ask for lines ahead (qmm.cpp's panel).
template <int BITS, int T>
M7_TARGET void kpanel(const uint8_t* w, const uint8_t* values, const uint8_t* sc,
                      const float* factors, const at::Half* d, const at::Half* dmin,
                      const int8_t* q, const float* a, const float* sg, const int32_t* s16,
                      int64_t K, bool stream, float* y, int64_t N) {
  constexpr int64_t kBlockBytes = BITS * 64, kPerSuper = kSuper / kBlock;
  const int64_t nb = K / kBlock;
  for (int64_t pass = 0; pass < kParts; pass += kTogether<T>) {   // rows r0 .. of the panel
    VF acc[kTogether<T>][T] = {};
    for (int64_t s = 0; s < nb / kPerSuper; ++s) {
      // the super-block's sum before its activation scale (one scale per 256 inputs)
      VF part[kTogether<T>][T] = {};
      VF dv[kTogether<T>] = {}, dmv[kTogether<T>] = {};
      if (factors == nullptr) super_factors<BITS, kTogether<T>>(d, dmin, s, pass, dv, dmv);
      for (int64_t b = s * kPerSuper; b < (s + 1) * kPerSuper; ++b) {
        const bool unpacked = kUnpackOnce<BITS> && values != nullptr;
        if (stream && !unpacked) prefetch_lines(w + (b + kPrefetchBlocks) * kBlockBytes, BITS);
        VF f0s[kTogether<T>], f1s[kTogether<T>];
        if (factors == nullptr) {
          block_factors<BITS, kTogether<T>>(sc, dv, dmv, b, pass, f0s, f1s);
        } else {
          for (int64_t h = 0; h < kTogether<T>; ++h) {
            f0s[h] = f_load(factors + 32 * b + (pass + h) * kLanes);
            f1s[h] = f_load(factors + 32 * b + 16 + (pass + h) * kLanes);
          }
        }
        for (int64_t h = 0; h < kTogether<T>; ++h) {
          const int64_t r0 = (pass + h) * kLanes;
          VI wv[8];
          if (unpacked) {
            for (int i = 0; i < 8; ++i) wv[i] = i_load(values + 512 * b + 64 * i + 4 * r0);
          } else {
            unpack<BITS>(w + b * kBlockBytes + 4 * r0, wv);
          }
          const VF f0 = f0s[h], f1 = f1s[h];
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t) {   // unrolled, so that acc[] and part[] stay in registers
            const int32_t* v = reinterpret_cast<const int32_t*>(q + (b * T + t) * kBlock);
            if constexpr (BITS == 6) {
              // even registers pair with inputs 0..15 of the block, odd ones with 16..31; the
              // chains start at -32 x the halves' sums (q - 32); one row takes two chains a
              // half, several rows are chains enough
              const int32_t* sv = s16 + 2 * (b * T + t);
              VI lo0 = i_set1(-32 * sv[0]), hi0 = i_set1(-32 * sv[1]);
              VI lo1 = i_zero(), hi1 = lo1;
              VI& lo_b = T == 1 ? lo1 : lo0;
              VI& hi_b = T == 1 ? hi1 : hi0;
              lo0 = dpbusd2(lo0, wv[0], v[0], wv[2], v[1]);
              hi0 = dpbusd2(hi0, wv[1], v[4], wv[3], v[5]);
              lo_b = dpbusd2(lo_b, wv[4], v[2], wv[6], v[3]);
              hi_b = dpbusd2(hi_b, wv[5], v[6], wv[7], v[7]);
              const VI lo = T == 1 ? i_add(lo0, lo1) : lo0;
              const VI hi = T == 1 ? i_add(hi0, hi1) : hi0;
              part[h][t] = f_fmadd(f0, f_from_i(lo), part[h][t]);
              part[h][t] = f_fmadd(f1, f_from_i(hi), part[h][t]);
            } else {
              const VI sum = block_dot<true, T == 1 ? 4 : 2>(wv, q + (b * T + t) * kBlock);
              part[h][t] = f_fmadd(f0, f_from_i(sum), part[h][t]);
              acc[h][t] = f_fnmadd(f1, f_set1(sg[b * T + t]), acc[h][t]);  // scaled
            }
          }
        }
      }
      for (int64_t h = 0; h < kTogether<T>; ++h)
        for (int t = 0; t < T; ++t)
          acc[h][t] = f_fmadd(part[h][t], f_set1(a[s * kPerSuper * T + t]), acc[h][t]);
    }
    for (int64_t h = 0; h < kTogether<T>; ++h)
      for (int t = 0; t < T; ++t) f_store(y + t * N + (pass + h) * kLanes, acc[h][t]);
  }
}

template <int BITS>
void kspan(const mistral7b::Product& p, int64_t M, int64_t K, int64_t p0, int64_t p1) {
  const mistral7b::ActBlocks& acts = *p.acts;
  // scale bytes per row: Q6_K one per 16 values, Q4_K / Q5_K 12 per super-block
  const int64_t nb = K / kBlock, supers = K / kSuper, scale_bytes = BITS == 6 ? K / 16 : supers * 12;
  const auto* w = p.w;
  const auto* sc = static_cast<const uint8_t*>(p.scale);
  const auto* d = static_cast<const at::Half*>(p.super_d);
  const auto* dmin = static_cast<const at::Half*>(p.super_min);
  // more than one tile of rows: each panel's block factors computed once, not once a tile,
  // and a few panels (kGroupBytes of their weights) taken through all the tiles together, as
  // qmm.cpp's panels_span does. Q5_K / Q6_K values are unpacked once into memory too (their
  // top bits cost more to place than loading them back does); Q4_K's nibbles are unpacked
  // in registers by each tile, as qmm.cpp does (measured faster, and a group then holds
  // twice the panels)
  const bool once = M > kMaxTile;
  const int64_t per_group = once ? std::max<int64_t>(1, mistral7b::kGroupBytes /
                                                            ((kUnpackOnce<BITS> ? 512 : BITS * 64) * nb))
                                 : 1;
  std::vector<uint8_t> values(once && kUnpackOnce<BITS> ? per_group * 512 * nb : 0);
  std::vector<float> factors(once ? per_group * 32 * nb : 0);
  for (int64_t g0 = p0; g0 < p1; g0 += per_group) {
    const int64_t g1 = std::min(p1, g0 + per_group);
    for (int64_t pi = g0; once && pi < g1; ++pi) {
      if constexpr (kUnpackOnce<BITS>)
        unpack_values<BITS>(w + pi * nb * BITS * 64, nb, values.data() + (pi - g0) * 512 * nb);
      unpack_factors<BITS>(sc + pi * scale_bytes * kRows, d + pi * supers * kRows,
                           dmin ? dmin + pi * supers * kRows : nullptr, nb,
                           factors.data() + (pi - g0) * 32 * nb);
    }
    for (int64_t m = 0; m < M; m += kMaxTile) {
      const int64_t T = std::min<int64_t>(kMaxTile, M - m);
      const mistral7b::ActBlocks::Tile at = acts.tile(m, K, kBlock);
      const int8_t* qm = at.q;
      const float *am = at.a, *gm = at.sg;
      const int32_t* vm = at.s16;
      for (int64_t pi = g0; pi < g1; ++pi) {
        const uint8_t* wp = w + pi * nb * BITS * 64;
        const uint8_t* sp = sc + pi * scale_bytes * kRows;
        const at::Half* dp = d + pi * supers * kRows;
        const at::Half* dmp = dmin ? dmin + pi * supers * kRows : nullptr;
        const uint8_t* vp = values.empty() ? nullptr : values.data() + (pi - g0) * 512 * nb;
        const float* up = once ? factors.data() + (pi - g0) * 32 * nb : nullptr;
        float* ym = p.y + m * p.N + pi * kRows;
        const bool stream = m == 0;   // the first tile brings the group's weights into L2
        with_tile(T, [&](auto rows) {
          constexpr int R = decltype(rows)::value;
          kpanel<BITS, R>(wp, vp, sp, up, dp, dmp, qm, am, gm, vm, K, stream, ym, p.N);
        });
      }
    }
  }
}

mistral7b::SpanFn kquant_span(int64_t bits) {
  return bits == 4 ? &kspan<4> : bits == 5 ? &kspan<5> : &kspan<6>;
}

}  // namespace M7_NS

#if M7_PRIMARY
namespace mistral7b {

void check_kweight(const QWeight& q, int64_t K) {
  TORCH_CHECK(q.bits >= 4 && q.bits <= 6 && q.super_d.has_value(), "a K-quant has 4 to 6 bits");
  const bool six = q.bits == 6;
  const int64_t N = q.n_out;
  TORCH_CHECK(N % kPanelRows == 0 && K % kSuperInputs == 0, "K-quants need N a multiple of 16, K of 256");
  TORCH_CHECK(q.group == (six ? 16 : 32), "K-quant sub-blocks are 16 (Q6_K) or 32 inputs");
  TORCH_CHECK(q.w.scalar_type() == at::kByte && q.w.is_contiguous() &&
                  q.w.numel() == N * K * q.bits / 8,
              "w must hold ", N * K * q.bits / 8, " contiguous bytes");
  TORCH_CHECK(q.scale.is_contiguous() && q.scale.element_size() == 1 &&
                  q.scale.numel() == N * (six ? K / 16 : K / kSuperInputs * 12),
              "sub-block scales: the file's bytes, 16 (Q6_K) or 12 per super-block and row");
  TORCH_CHECK(!q.mins.has_value(), "K-quant mins are packed with their scales");
  const auto halves = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->scalar_type() == at::kHalf && t->is_contiguous() &&
           t->numel() == N * (K / kSuperInputs);
  };
  TORCH_CHECK(halves(q.super_d) && (six || halves(q.super_min)),
              "d (and dmin) must be float16, one per super-block and row");
}


at::Tensor kqmm(const at::Tensor& x, const QWeight& q) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "x must be a contiguous 2-D float32 tensor");
  const int64_t M = x.size(0), K = x.size(1);
  check_kweight(q, K);
  at::Tensor y = at::empty({M, q.n_out}, x.options());
  if (M == 0) return y;
  ActBlocks acts;
  quantize_acts(x, kBlockInputs, acts, kSuperInputs);
  const Product p{q.w.data_ptr<uint8_t>(), q.scale.data_ptr(), nullptr, q.super_d->data_ptr(),
                  q.super_min ? q.super_min->data_ptr() : nullptr, 0.0f, q.n_out, q.group,
                  y.data_ptr<float>(), &acts, M7_ON_ISA(kquant_span(q.bits))};
  at::parallel_for(0, q.n_out / kPanelRows, 1, [&](int64_t p0, int64_t p1) { p.span(p, M, K, p0, p1); });
  return y;
}

}  // namespace mistral7b

namespace {

// x (M, K) float32; w the panels; scale the sub-block bytes; d / dmin float16 (dmin None for
// Q6_K); bits 4, 5 or 6; group 32 or 16 (Q6_K). -> (M, N) float32.
at::Tensor kqmm_op(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                   const at::Tensor& d,
                   const std::optional<at::Tensor>& dmin, int64_t bits, int64_t group,
                   int64_t n_out) {
  mistral7b::QWeight q;
  q.w = w;
  q.scale = scale;
  q.super_d = d;
  q.super_min = dmin;
  q.bits = bits;
  q.group = group;
  q.n_out = n_out;
  return mistral7b::kqmm(x, q);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mistral7b_qmm, m) {
  m.def("kqmm(Tensor x, Tensor w, Tensor scale, Tensor d, Tensor? dmin, int bits, "
        "int group, int n_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistral7b_qmm, CPU, m) {
  m.impl("kqmm", &kqmm_op);
}

#endif  // M7_PRIMARY
