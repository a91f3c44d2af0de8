// y = x @ W^T for weights stored as 4- or 8-bit integers, on x86 CPUs with AVX-512 VNNI or
// AVX2 (simd.h: one text for both).
//
// The activations are quantized on the fly to int8 per block of 32 values (scale = max|x|/127,
// as ggml's Q8_0 does), so every product is an 8-bit dot product: one `vpdpbusd` multiplies 64
// unsigned weight bytes by 64 signed activation bytes and adds them in groups of four into 16
// int32 lanes.
//
// Weight layout ("panels"): rows are taken 16 at a time, so that the 16 int32 lanes of one
// register are 16 output rows and no horizontal sums are ever needed. For panel p and block b
// of 32 inputs:
//
//   4-bit:  4 x 64 bytes; chunk j (0..3), lane r (row 16p + r), byte t (0..3):
//           low nibble = q[row][32b + 4j + t], high nibble = q[row][32b + 16 + 4j + t]
//   8-bit:  8 x 64 bytes; chunk j (0..7), lane r, byte t: q[row][32b + 4j + t] + 128
//
// so the low nibbles of chunk j pair with activation bytes 4j..4j+3 (one broadcast dword) and
// the high nibbles with bytes 16+4j..16+4j+3. Values are unsigned (0..15, or q + 128 for int8).
//
// Scales come per group of G inputs (G a multiple of 32; G = K is per output channel), stored
// [panel][group][16 rows] in float16 or float32. A weight is w = d * q + m: either with a
// stored m per (row, group) ("affine"), or m = -offset * d (Q4_0: offset 8; int8: offset 128).
// For one group g of one output row, with activation blocks b of scale a_b and int8 values v:
//
//   sum_k w_k x_k ~= d_g * sum_b a_b * sum_k q_k v_k  +  m_g * sum_b a_b * sum_k v_k
//
// The second sum (`sg` below) depends on the activations only and is computed once per row.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd.h"
#include "qmm_avx2.h"

namespace M7_NS {

constexpr int64_t kBlock = mistral7b::kBlockInputs;  // inputs per activation block
constexpr int64_t kRows = mistral7b::kPanelRows;     // output rows per panel

// Activations of M rows, quantized (kernels.h)
using QuantizedActs = mistral7b::ActBlocks;
using mistral7b::Product;

template <typename X>
M7_TARGET inline float block_amax(const X* x) {
  VF m = f_abs(f_load(x));
  for (int c = 1; c < kBlock / kLanes; ++c) m = f_max(m, f_abs(f_load(x + c * kLanes)));
  return f_hmax(m);
}

// One activation row: its blocks of 32 to int8 with one scale per `span` inputs (kBlock, or
// kSuperInputs for K-quants); `a` still holds a scale per block (the same for the blocks of
// one span). The row is row t of a tile of T (ActBlocks): the pointers are at its first
// entries, and a block's (a group's) entries are T apart.
template <typename X>
M7_TARGET void quantize_row(const X* x, int64_t K, int64_t G, int64_t span, int64_t T, int8_t* q,
                            float* a, float* sg, int32_t* s16, int32_t* s32) {
  const int64_t blocks_per_group = G / kBlock, blocks_per_span = span / kBlock;
  float group_sum = 0.0f, amax = 0.0f;
  for (int64_t b = 0; b < K / kBlock; ++b) {
    if (b % blocks_per_span == 0) {
      amax = 0.0f;
      for (int64_t i = b; i < b + blocks_per_span; ++i) amax = std::max(amax, block_amax(x + i * kBlock));
    }
    const float scale = amax / 127.0f;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    const VF vinv = f_set1(inv);
    int32_t* sb = s16 + 2 * b * T;
    sb[0] = sb[1] = 0;
    for (int c = 0; c < kBlock / kLanes; ++c) {
      // round to nearest, ties to even (the MXCSR default)
      const VI v = f_round_i(f_mul(f_load(x + b * kBlock + c * kLanes), vinv));
      i_store_i8(q + b * T * kBlock + c * kLanes, v);
      sb[c * kLanes / 16] += i_sum(v);
    }
    a[b * T] = scale;
    s32[b * T] = 8 * (sb[0] + sb[1]);
    group_sum += scale * static_cast<float>(sb[0] + sb[1]);
    if ((b + 1) % blocks_per_group == 0) {
      sg[((b + 1) / blocks_per_group - 1) * T] = group_sum;
      group_sum = 0.0f;
    }
  }
}

template <int BITS>
M7_TARGET inline void load_block(const uint8_t* wb, VI wv[8]) {
  if constexpr (BITS == 4) {
    unpack_nibbles(wb, wv);
  } else {
    for (int j = 0; j < 8; ++j) wv[j] = i_load(wb + 64 * j);
  }
}

// One panel (16 output rows) times a tile of T activation rows (ActBlocks: q, a, sg at the
// tile's). BITS = 4 or 8; S = float or at::Half. `stream`: the weights come from memory (the
// first tile to take this panel), so the kernel asks for lines ahead; later tiles find them
// in L2, where the requests only cost issue slots (7B Q4_0 pre-fill, AVX2: ~3%).
template <int BITS, typename S, bool AFFINE, int T, typename Y>
M7_TARGET void panel(const uint8_t* w, const S* scale, const S* mins, const int8_t* q,
                     const float* a, const float* sg, int64_t K, int64_t G, float offset,
                     bool stream, Y* y, int64_t N) {
  constexpr int64_t kBlockBytes = BITS * 64;
  constexpr int kChains = T == 1 ? 4 : 2;
  constexpr float bias = BITS == 8 ? kEightBias : 0;  // block_dot's sums are of u - bias
  const int64_t n_groups = K / G, blocks_per_group = G / kBlock;
  for (int64_t pass = 0; pass < kParts; pass += kTogether<T>) {   // rows r0 .. of the panel
    VF acc[kTogether<T>][T] = {};
    for (int64_t g = 0; g < n_groups; ++g) {
      VF inner[kTogether<T>][T] = {};
      for (int64_t bb = 0; bb < blocks_per_group; ++bb) {
        const int64_t b = g * blocks_per_group + bb;
        const uint8_t* wb = w + b * kBlockBytes;
        if (stream) prefetch_lines(wb + kPrefetchBlocks * kBlockBytes, BITS);
        for (int64_t h = 0; h < kTogether<T>; ++h) {
          VI wv[8];
          load_block<BITS>(wb + 4 * (pass + h) * kLanes, wv);
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t) {   // unrolled: acc[] stays in registers
            const VI sum = block_dot<BITS == 4, kChains>(wv, q + (b * T + t) * kBlock);
            inner[h][t] = f_fmadd(f_from_i(sum), f_set1(a[b * T + t]), inner[h][t]);
          }
        }
      }
      for (int64_t h = 0; h < kTogether<T>; ++h) {
        const int64_t r0 = (pass + h) * kLanes;
        const VF d = f_load(scale + g * kRows + r0);
        if constexpr (AFFINE) {
          // sums of (u - bias) v: w = d u + m = d (u - bias) + (m + bias d)
          const VF m0 = f_load(mins + g * kRows + r0);
          const VF m = bias ? f_fmadd(d, f_set1(bias), m0) : m0;
          for (int t = 0; t < T; ++t)
            acc[h][t] = f_fmadd(d, inner[h][t], f_fmadd(m, f_set1(sg[g * T + t]), acc[h][t]));
        } else {
          for (int t = 0; t < T; ++t) {
            const VF corr = f_set1((offset - bias) * sg[g * T + t]);
            acc[h][t] = f_fmadd(d, f_sub(inner[h][t], corr), acc[h][t]);
          }
        }
      }
    }
    for (int64_t h = 0; h < kTogether<T>; ++h)
      for (int t = 0; t < T; ++t) f_store(y + t * N + (pass + h) * kLanes, acc[h][t]);
  }
}

// The offset `block_panel` takes: q - 8 for 4-bit values (Q4_0, int4), q + 128 - 128 for
// 8-bit ones (Q8_0, int8); tile() sends any other to `panel`.
template <int BITS>
constexpr int32_t kSymmetricOffset = BITS == 4 ? 8 : 128;

// Whether a weight has `block_panel`'s form: no mins, a scale per block of 32, that offset
template <int BITS, bool AFFINE>
inline bool block_form(int64_t G, float offset) {
  return !AFFINE && G == kBlock && offset == kSymmetricOffset<BITS>;
}

// `panel` for the symmetric form with a scale per block of 32 (Q4_0, Q8_0): the offset is
// taken off in int32 (offset x the block's sum: s32 holds 8 x it, 128 x is a shift of that),
// so each block of each row costs one conversion and two float operations, d * a and the
// accumulation (`panel`'s order takes three): the float work beside the 8 vpdpbusd is what
// bounds pre-fill.
template <int BITS, typename S, int T, typename Y>
M7_TARGET void block_panel(const uint8_t* w, const S* scale, const int8_t* q, const float* a,
                           const int32_t* s32, int64_t K, bool stream, Y* y, int64_t N) {
  constexpr int64_t kBlockBytes = BITS * 64;
  constexpr int kChains = T == 1 ? 4 : 2;
  // block_dot's sums are of u - bias: what is left to take off, 8 (4-bit), 128 or none (8-bit)
  constexpr int32_t kUnbiased = kSymmetricOffset<BITS> - (BITS == 8 ? kEightBias : 0);
  static_assert(kUnbiased == 0 || kUnbiased == 8 || kUnbiased == 128);
  constexpr int kShift = kUnbiased == 8 ? 0 : 4;   // s32 is 8 x the sum
  const int64_t n_blocks = K / kBlock;
  for (int64_t pass = 0; pass < kParts; pass += kTogether<T>) {   // rows r0 .. of the panel
    VF acc[kTogether<T>][T] = {};
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint8_t* wb = w + b * kBlockBytes;
      if (stream) prefetch_lines(wb + kPrefetchBlocks * kBlockBytes, BITS);
      for (int64_t h = 0; h < kTogether<T>; ++h) {
        const int64_t r0 = (pass + h) * kLanes;
        VI wv[8];
        load_block<BITS>(wb + 4 * r0, wv);
        const VF d = f_load(scale + b * kRows + r0);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {   // unrolled: acc[] stays in registers
          const VI dot = block_dot<BITS == 4, kChains>(wv, q + (b * T + t) * kBlock);
          const VI sum = kUnbiased == 0   ? dot
                         : kShift == 0    ? i_sub(dot, i_set1(s32[b * T + t]))
                                          : i_sub(dot, i_sll32(i_set1(s32[b * T + t]), kShift));
          acc[h][t] = f_fmadd(f_from_i(sum), f_mul(d, f_set1(a[b * T + t])), acc[h][t]);
        }
      }
    }
    for (int64_t h = 0; h < kTogether<T>; ++h)
      for (int t = 0; t < T; ++t) f_store(y + t * N + (pass + h) * kLanes, acc[h][t]);
  }
}

template <typename X>
void quantize_acts(const X* x, int64_t M, int64_t K, int64_t G, QuantizedActs& acts,
                   int64_t span = kBlock) {
  const int64_t n_blocks = K / kBlock, n_groups = K / G;
  acts.q.resize(M * K);
  acts.a.resize(M * n_blocks);
  acts.sg.resize(M * n_groups);
  acts.s16.resize(M * K / 16);
  acts.s32.resize(M * n_blocks);
  // by tile, so no two threads write one tile's interleaved lines
  const int64_t tiles = (M + kMaxTile - 1) / kMaxTile;
  at::parallel_for(0, tiles, 16 / kMaxTile, [&](int64_t i0, int64_t i1) {
    for (int64_t m = i0 * kMaxTile; m < std::min(M, i1 * kMaxTile); m += kMaxTile) {
      const int64_t T = std::min<int64_t>(kMaxTile, M - m);   // the tile from row m
      for (int64_t t = 0; t < T; ++t)
        quantize_row(x + (m + t) * K, K, G, span, T, acts.q.data() + m * K + t * kBlock,
                     acts.a.data() + m * n_blocks + t, acts.sg.data() + m * n_groups + t,
                     acts.s16.data() + m * K / 16 + 2 * t, acts.s32.data() + m * n_blocks + t);
    }
  });
}

// One panel times the tile of T <= kMaxTile activation rows from row m: `block_panel` where
// it applies.
template <int BITS, typename S, bool AFFINE, int T, typename X>
M7_TARGET void tile(const QuantizedActs& acts, int64_t m, int64_t K, int64_t N, int64_t G,
                    const uint8_t* wp, const S* sp, const S* mp, float offset, bool stream, X* y,
                    int64_t p) {
  const QuantizedActs::Tile at = acts.tile(m, K, G);
  X* ym = y + m * N + p * kRows;
  if (block_form<BITS, AFFINE>(G, offset))
    block_panel<BITS, S, T>(wp, sp, at.q, at.a, at.s32, K, stream, ym, N);
  else
    panel<BITS, S, AFFINE, T>(wp, sp, mp, at.q, at.a, at.sg, K, G, offset, stream, ym, N);
}

// panels p0 .. p1-1 of one weight times the M quantized activation rows. With more than one
// tile of rows, a few panels (kGroupBytes of weights, kept in L2) go through all the tiles
// together, so each tile's activations are read from L3 once per few panels, not per panel.
template <int BITS, typename S, bool AFFINE, typename X>
void panels_span(const QuantizedActs& acts, int64_t M, int64_t K, int64_t N, int64_t G,
                 const uint8_t* w, const S* scale, const S* mins, float offset, X* y,
                 int64_t p0, int64_t p1) {
  using mistral7b::kGroupBytes;
  const int64_t panel_bytes = K / kBlock * BITS * 64, panel_scales = K / G * kRows;
  // AVX2, 4-bit values with a scale per block (Q4_0, int4 g32): full tiles take qmm_avx2.h's
  // block step, the group's first tile unpacking the values for the others
  const bool unpack =
      kTile4<BITS, AFFINE> && M >= kTile4MinRows && block_form<BITS, AFFINE>(G, offset);
  const int64_t group_bytes = unpack ? 2 * panel_bytes : panel_bytes;
  const int64_t per_group = M > kMaxTile ? std::max<int64_t>(1, kGroupBytes / group_bytes) : 1;
  std::vector<uint8_t> values(unpack ? per_group * group_bytes : 0);
  for (int64_t g0 = p0; g0 < p1; g0 += per_group) {
    const int64_t g1 = std::min(p1, g0 + per_group);
    for (int64_t m = 0; m < M; m += kMaxTile) {
      for (int64_t p = g0; p < g1; ++p) {
        const uint8_t* wp = w + p * panel_bytes;
        const S* sp = scale + p * panel_scales;
        const S* mp = AFFINE ? mins + p * panel_scales : nullptr;
        if constexpr (kTile4<BITS, AFFINE>) {
          if (unpack && M - m >= kMaxTile) {
            const QuantizedActs::Tile at = acts.tile(m, K, G);
            block_panel_tile4(m == 0 ? wp : nullptr, values.data() + (p - g0) * group_bytes, sp,
                              at.q, at.a, at.s32, K, y + m * N + p * kRows, N);
            continue;
          }
        }
        // the first tile brings the group's weights into L2
        const bool stream = m == 0;
        with_tile(M - m, [&](auto rows) {
          constexpr int R = decltype(rows)::value;
          tile<BITS, S, AFFINE, R>(acts, m, K, N, G, wp, sp, mp, offset, stream, y, p);
        });
      }
    }
  }
}

template <int BITS, typename S, bool AFFINE, typename X>
void run(const X* x, int64_t M, int64_t K, int64_t N, int64_t G, const uint8_t* w,
         const S* scale, const S* mins, float offset, X* y) {
  QuantizedActs acts;
  quantize_acts(x, M, K, G, acts);
  at::parallel_for(0, N / kRows, 1, [&](int64_t p0, int64_t p1) {
    panels_span<BITS, S, AFFINE, X>(acts, M, K, N, G, w, scale, mins, offset, y, p0, p1);
  });
}

// Several weights of the same input width times one float32 x, in one parallel region
// (qmm_many): the panels of all of them are shared out together, each computed exactly as
// `run` does.
template <int BITS, typename S, bool AFFINE>
void product_span(const Product& p, int64_t M, int64_t K, int64_t p0, int64_t p1) {
  panels_span<BITS, S, AFFINE, float>(*p.acts, M, K, p.N, p.G, p.w,
                                      static_cast<const S*>(p.scale),
                                      static_cast<const S*>(p.mins), p.offset, p.y, p0, p1);
}

template <typename S>
auto span_for(int64_t bits, bool affine) -> void (*)(const Product&, int64_t, int64_t, int64_t,
                                                     int64_t) {
  if (bits == 4) return affine ? &product_span<4, S, true> : &product_span<4, S, false>;
  return affine ? &product_span<8, S, true> : &product_span<8, S, false>;
}

template <typename S, typename X>
void dispatch_affine(int64_t bits, bool affine, const X* x, int64_t M, int64_t K, int64_t N,
                     int64_t G, const uint8_t* w, const S* scale, const S* mins, float offset,
                     X* y) {
  if (bits == 4) {
    if (affine) run<4, S, true>(x, M, K, N, G, w, scale, mins, offset, y);
    else run<4, S, false>(x, M, K, N, G, w, scale, mins, offset, y);
  } else {
    if (affine) run<8, S, true>(x, M, K, N, G, w, scale, mins, offset, y);
    else run<8, S, false>(x, M, K, N, G, w, scale, mins, offset, y);
  }
}

// ------------------------------------------------------- this instruction set's entry points

void qmm_into(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
              const std::optional<at::Tensor>& mins, int64_t bits, int64_t group, double offset,
              at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const bool affine = mins.has_value();
  const auto* wp = w.data_ptr<uint8_t>();
  const auto go = [&](auto* xp, auto* yp) {
    if (scale.scalar_type() == at::kFloat)
      dispatch_affine<float>(bits, affine, xp, M, K, N, group, wp, scale.data_ptr<float>(),
                             affine ? mins->data_ptr<float>() : nullptr,
                             static_cast<float>(offset), yp);
    else
      dispatch_affine<at::Half>(bits, affine, xp, M, K, N, group, wp,
                                scale.data_ptr<at::Half>(),
                                affine ? mins->data_ptr<at::Half>() : nullptr,
                                static_cast<float>(offset), yp);
  };
  if (x.scalar_type() == at::kFloat)
    go(x.data_ptr<float>(), y.data_ptr<float>());
  else
    go(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
}

void quantize_acts(const at::Tensor& x, int64_t G, QuantizedActs& acts, int64_t span) {
  if (x.scalar_type() == at::kFloat)
    quantize_acts(x.data_ptr<float>(), x.size(0), x.size(1), G, acts, span);
  else
    quantize_acts(x.data_ptr<at::BFloat16>(), x.size(0), x.size(1), G, acts, span);
}

mistral7b::SpanFn qmm_span(bool half, int64_t bits, bool affine) {
  return half ? span_for<at::Half>(bits, affine) : span_for<float>(bits, affine);
}

}  // namespace M7_NS
