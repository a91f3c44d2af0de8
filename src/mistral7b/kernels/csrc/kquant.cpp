// ggml's K-quants (Q4_K, Q5_K, Q6_K: what a Q4_K_M or Q5_K_M file holds) on their own bits:
// the repack from GGUF blocks into panels (gguf_kpanels) and y = x @ W^T over them (kqmm),
// with the activations quantized per block of 32 as qmm.cpp does.
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
// Per 32-block b of one output row, with activation scale a_b, int8 values v and the 16-value
// sums s16:
//   Q4_K/Q5_K  d * sum_b sc_b a_b (sum q v)  -  dmin * sum_b m_b a_b (sum v)
//   Q6_K       d * sum_b a_b (sc_lo (sum_lo q v - 32 s16_lo) + sc_hi (sum_hi ... ))
// the brackets exact in int32, the rest float32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

constexpr int64_t kBlock = mistral7b::kBlockInputs;
constexpr int64_t kRows = mistral7b::kPanelRows;
constexpr int64_t kSuper = 256;
constexpr int kMaxTile = 4;  // activation rows that share one unpacked weight block

// ggml type ids
constexpr int64_t kQ4K = 12, kQ5K = 13, kQ6K = 14;

int bits_of(int64_t kind) { return kind == kQ4K ? 4 : kind == kQ5K ? 5 : 6; }
int64_t super_bytes(int64_t kind) { return kind == kQ4K ? 144 : kind == kQ5K ? 176 : 210; }

#if M7_X86

template <int BITS>
M7_TARGET inline void unpack(const uint8_t* wb, __m512i wv[8]) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int j = 0; j < 4; ++j) {
    const __m512i v = _mm512_loadu_si512(wb + 64 * j);
    wv[2 * j] = _mm512_and_si512(v, low4);
    wv[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
  }
  // register i holds value 4k + t of the block, k = 4 (i % 2) + i / 2 (qmm.cpp's pairing)
  if constexpr (BITS == 5) {
    // bit k of each byte to bit 4 (16-bit shifts: the mask drops what crosses bytes)
    const __m512i h = _mm512_loadu_si512(wb + 256), bit4 = _mm512_set1_epi8(0x10);
    for (int i = 0; i < 8; ++i) {
      const int k = 4 * (i % 2) + i / 2;
      const __m512i moved = k <= 4 ? _mm512_slli_epi16(h, 4 - k) : _mm512_srli_epi16(h, k - 4);
      wv[i] = _mm512_or_si512(wv[i], _mm512_and_si512(moved, bit4));
    }
  } else if constexpr (BITS == 6) {
    // bits 2 (k % 4), + 1 of chunk 4 + k / 4 to bits 4, 5; k / 4 = i % 2, k % 4 = i / 2
    const __m512i h0 = _mm512_loadu_si512(wb + 256), h1 = _mm512_loadu_si512(wb + 320);
    const __m512i bits45 = _mm512_set1_epi8(0x30);
    for (int i = 0; i < 8; ++i) {
      const __m512i h = i % 2 ? h1 : h0;
      const int at = 2 * (i / 2);
      const __m512i moved = at <= 4 ? _mm512_slli_epi16(h, 4 - at) : _mm512_srli_epi16(h, at - 4);
      wv[i] = _mm512_or_si512(wv[i], _mm512_and_si512(moved, bits45));
    }
  }
}

M7_TARGET inline __m512 load_i8(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

M7_TARGET inline __m512 load_half(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// One panel (16 output rows) times T activation rows; pointers at the panel's own data and
// the first activation row's.
// Sub-block j's 6-bit scale and min of 16 rows from a super-block's 12 packed bytes (each
// 16 rows wide): get_scale_min_k4 on 16 lanes.
M7_TARGET inline void scale_min(const uint8_t* packed, int j, __m512* sc, __m512* mn) {
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
  *sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(s));
  *mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m));
}

// Q4_K / Q5_K scales and mins of a panel's every block, unpacked once for many row tiles
// (pre-fill): block b's 16 scales at out[32 b], its mins at out[32 b + 16].
M7_TARGET void unpack_scales(const uint8_t* sc, int64_t nb, float* out) {
  for (int64_t b = 0; b < nb; ++b) {
    __m512 s, m;
    scale_min(sc + b / 8 * 12 * kRows, static_cast<int>(b % 8), &s, &m);
    _mm512_storeu_ps(out + 32 * b, s);
    _mm512_storeu_ps(out + 32 * b + 16, m);
  }
}

// `unpacked`: the panel's Q4_K / Q5_K scales from unpack_scales, or null (read from `sc`).
template <int BITS, int T>
M7_TARGET void kpanel(const uint8_t* w, const uint8_t* sc, const float* unpacked,
                      const at::Half* d, const at::Half* dmin, const int8_t* q, const float* a,
                      const float* sg, const int32_t* s16, int64_t K, float* y, int64_t N) {
  constexpr bool kSixBit = BITS == 6;
  constexpr int64_t kBlockBytes = BITS * 64;
  const int64_t nb = K / kBlock;
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t s = 0; s < K / kSuper; ++s) {
    __m512 inner[T], minner[T];
    for (int t = 0; t < T; ++t) inner[t] = minner[t] = _mm512_setzero_ps();
    for (int64_t b = s * 8; b < s * 8 + 8; ++b) {
      __m512i wv[8];
      unpack<BITS>(w + b * kBlockBytes, wv);
      if constexpr (kSixBit) {
        const __m512 sc_lo = load_i8(sc + 2 * b * kRows), sc_hi = load_i8(sc + (2 * b + 1) * kRows);
        for (int t = 0; t < T; ++t) {
          const int32_t* v = reinterpret_cast<const int32_t*>(q + t * K + b * kBlock);
          // even registers pair with inputs 0..15 of the block, odd ones with 16..31
          __m512i lo0 = _mm512_setzero_si512(), lo1 = lo0, hi0 = lo0, hi1 = lo0;
          lo0 = _mm512_dpbusd_epi32(lo0, wv[0], _mm512_set1_epi32(v[0]));
          hi0 = _mm512_dpbusd_epi32(hi0, wv[1], _mm512_set1_epi32(v[4]));
          lo1 = _mm512_dpbusd_epi32(lo1, wv[2], _mm512_set1_epi32(v[1]));
          hi1 = _mm512_dpbusd_epi32(hi1, wv[3], _mm512_set1_epi32(v[5]));
          lo0 = _mm512_dpbusd_epi32(lo0, wv[4], _mm512_set1_epi32(v[2]));
          hi0 = _mm512_dpbusd_epi32(hi0, wv[5], _mm512_set1_epi32(v[6]));
          lo1 = _mm512_dpbusd_epi32(lo1, wv[6], _mm512_set1_epi32(v[3]));
          hi1 = _mm512_dpbusd_epi32(hi1, wv[7], _mm512_set1_epi32(v[7]));
          const int32_t* sv = s16 + t * (K / 16) + 2 * b;
          const __m512i lo = _mm512_sub_epi32(_mm512_add_epi32(lo0, lo1), _mm512_set1_epi32(32 * sv[0]));
          const __m512i hi = _mm512_sub_epi32(_mm512_add_epi32(hi0, hi1), _mm512_set1_epi32(32 * sv[1]));
          const __m512 part = _mm512_fmadd_ps(sc_hi, _mm512_cvtepi32_ps(hi),
                                              _mm512_mul_ps(sc_lo, _mm512_cvtepi32_ps(lo)));
          inner[t] = _mm512_fmadd_ps(part, _mm512_set1_ps(a[t * nb + b]), inner[t]);
        }
      } else {
        __m512 scv, mv;
        if (unpacked != nullptr) {
          scv = _mm512_loadu_ps(unpacked + 32 * b);
          mv = _mm512_loadu_ps(unpacked + 32 * b + 16);
        } else {
          scale_min(sc + s * 12 * kRows, static_cast<int>(b - s * 8), &scv, &mv);
        }
        for (int t = 0; t < T; ++t) {
          const int32_t* v = reinterpret_cast<const int32_t*>(q + t * K + b * kBlock);
          __m512i sums[4];
          for (int c = 0; c < 4; ++c) sums[c] = _mm512_setzero_si512();
          for (int i = 0; i < 8; ++i)
            sums[i % 4] = _mm512_dpbusd_epi32(sums[i % 4], wv[i],
                                              _mm512_set1_epi32(v[(i % 2) * 4 + i / 2]));
          const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(sums[0], sums[1]),
                                               _mm512_add_epi32(sums[2], sums[3]));
          inner[t] = _mm512_fmadd_ps(
              scv, _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(a[t * nb + b])), inner[t]);
          minner[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sg[t * nb + b]), minner[t]);
        }
      }
    }
    const __m512 dv = load_half(d + s * kRows);
    if constexpr (kSixBit) {
      for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(dv, inner[t], acc[t]);
    } else {
      const __m512 dm = load_half(dmin + s * kRows);
      for (int t = 0; t < T; ++t)
        acc[t] = _mm512_fmadd_ps(dv, inner[t], _mm512_fnmadd_ps(dm, minner[t], acc[t]));
    }
  }
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(y + t * N, acc[t]);
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
  // more than one tile of rows: each panel's scales unpacked once, not once a tile
  std::vector<float> unpacked(BITS != 6 && M > kMaxTile ? 32 * nb : 0);
  float* up = unpacked.empty() ? nullptr : unpacked.data();
  for (int64_t pi = p0; pi < p1; ++pi) {
    const uint8_t* wp = w + pi * nb * BITS * 64;
    const uint8_t* sp = sc + pi * scale_bytes * kRows;
    const at::Half* dp = d + pi * supers * kRows;
    const at::Half* dmp = dmin ? dmin + pi * supers * kRows : nullptr;
    if (up != nullptr) unpack_scales(sp, nb, up);
    for (int64_t m = 0; m < M; m += kMaxTile) {
      const int64_t T = std::min<int64_t>(kMaxTile, M - m);
      const int8_t* qm = acts.q.data() + m * K;
      const float* am = acts.a.data() + m * nb;
      const float* gm = acts.sg.data() + m * nb;
      const int32_t* vm = acts.s16.data() + m * (K / 16);
      float* ym = p.y + m * p.N + pi * kRows;
      switch (T) {
        case 4: kpanel<BITS, 4>(wp, sp, up, dp, dmp, qm, am, gm, vm, K, ym, p.N); break;
        case 3: kpanel<BITS, 3>(wp, sp, up, dp, dmp, qm, am, gm, vm, K, ym, p.N); break;
        case 2: kpanel<BITS, 2>(wp, sp, up, dp, dmp, qm, am, gm, vm, K, ym, p.N); break;
        default: kpanel<BITS, 1>(wp, sp, up, dp, dmp, qm, am, gm, vm, K, ym, p.N);
      }
    }
  }
}

#endif  // M7_X86

// The sub-block scales of one GGUF super-block (Q4_K/Q5_K: 8 unsigned 6-bit ones and 8 mins,
// ggml's get_scale_min_k4; Q6_K: 16 signed) and the float16 bits of d and dmin.
void super_scales(int64_t kind, const uint8_t* blk, uint8_t* sc, uint8_t* mn, uint16_t* d,
                  uint16_t* dmin) {
  if (kind == kQ6K) {
    std::memcpy(sc, blk + 192, 16);
    std::memcpy(d, blk + 208, 2);
    return;
  }
  std::memcpy(d, blk, 2);
  std::memcpy(dmin, blk + 2, 2);
  const uint8_t* packed = blk + 4;
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      sc[j] = packed[j] & 63;
      mn[j] = packed[j + 4] & 63;
    } else {
      sc[j] = (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4);
      mn[j] = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
    }
  }
}

uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

uint32_t load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

constexpr uint64_t kLow = 0x0F0F0F0F0F0F0F0FULL;

// One 32-value block of one row into the panel block `ob` at lane r. `nib` points at the 32
// bytes whose nibble `high` (0: low, 1: high) holds the block's values in order; `hi` at 32
// bytes whose bits `shift` .. `shift` + BITS - 5 hold their top bits (BITS 5 or 6; else null).
template <int BITS>
void put_block(uint8_t* ob, int64_t r, const uint8_t* nib, int high, const uint8_t* hi,
               int shift) {
  // panel byte (chunk j, byte t) = value 4j + t in its low nibble, 16 + 4j + t in its high
  for (int w = 0; w < 2; ++w) {
    uint64_t a = load64(nib + 8 * w), b = load64(nib + 16 + 8 * w);
    if (high) {
      a >>= 4;
      b >>= 4;
    }
    const uint64_t out = (a & kLow) | ((b & kLow) << 4);
    std::memcpy(ob + 64 * (2 * w) + 4 * r, &out, 4);
    const uint32_t upper = static_cast<uint32_t>(out >> 32);
    std::memcpy(ob + 64 * (2 * w + 1) + 4 * r, &upper, 4);
  }
  if constexpr (BITS > 4) {
    // the top bits of value 4k + t go to byte t of the high chunk(s): BITS 5, bit k of
    // chunk 4; BITS 6, bits 2(k % 4) of chunk 4 + k / 4
    constexpr uint32_t mask = BITS == 5 ? 0x01010101u : 0x03030303u;
    uint32_t dw[8];
    for (int k = 0; k < 8; ++k) dw[k] = (load32(hi + 4 * k) >> shift) & mask;
    if constexpr (BITS == 5) {
      uint32_t out = 0;
      for (int k = 0; k < 8; ++k) out |= dw[k] << k;
      std::memcpy(ob + 256 + 4 * r, &out, 4);
    } else {
      for (int c = 0; c < 2; ++c) {
        const uint32_t out = dw[4 * c] | dw[4 * c + 1] << 2 | dw[4 * c + 2] << 4 |
                             dw[4 * c + 3] << 6;
        std::memcpy(ob + 256 + 64 * c + 4 * r, &out, 4);
      }
    }
  }
}

// One row's super-block `blk` into the 8 panel blocks from `ob` (lane r).
template <int BITS>
void put_super(int64_t kind, const uint8_t* blk, uint8_t* ob, int64_t r) {
  constexpr int64_t kBlockBytes = BITS * 64;
  if (kind == kQ6K) {
    // value 128 h + 32 q + l: nibble q / 2 of ql[64 h + 32 (q % 2) + l], top bits 2q of
    // qh[32 h + l]
    for (int b = 0; b < 8; ++b) {
      const int h = b / 4, q = b % 4;
      put_block<BITS>(ob + b * kBlockBytes, r, blk + 64 * h + 32 * (q % 2), q / 2,
                      blk + 128 + 32 * h, 2 * q);
    }
    return;
  }
  // Q4_K / Q5_K: value 32 s + l is nibble s % 2 of qs[32 (s / 2) + l]; Q5_K's fifth bit is
  // bit s of qh[l]
  const uint8_t* qs = blk + (kind == kQ4K ? 16 : 48);
  for (int b = 0; b < 8; ++b)
    put_block<BITS>(ob + b * kBlockBytes, r, qs + 32 * (b / 2), b % 2, blk + 16, b);
}

// GGUF Q4_K / Q5_K / Q6_K blocks (N rows of K / 256 super-blocks, uint8) -> the panels, the
// sub-block scale bytes, d and dmin (the header's layout; Q6_K's dmin empty), and one flag:
// every d and dmin finite.
std::vector<at::Tensor> gguf_kpanels(const at::Tensor& blocks, int64_t kind, int64_t N,
                                     int64_t K) {
  TORCH_CHECK(kind == kQ4K || kind == kQ5K || kind == kQ6K, "blocks must be Q4_K, Q5_K or Q6_K");
  TORCH_CHECK(N % kRows == 0 && K % kSuper == 0, "N must be a multiple of 16, K of 256");
  const at::Tensor src = blocks.contiguous();
  TORCH_CHECK(src.scalar_type() == at::kByte && src.numel() == N * (K / kSuper) * super_bytes(kind),
              "blocks must be N * K / 256 GGUF super-blocks of uint8");
  const int bits = bits_of(kind);
  const bool six = kind == kQ6K;
  const int64_t nb = K / kBlock, ns = K / kSuper, per_super = six ? 16 : 12;
  const int64_t bytes = super_bytes(kind), scale_at = six ? 192 : 4;
  at::Tensor w = mistral7b::weight_empty({N * K * bits / 8}, at::kByte);
  at::Tensor sc = mistral7b::weight_empty({N / kRows, ns * per_super, kRows},
                                          six ? at::kChar : at::kByte);
  at::Tensor d = mistral7b::weight_empty({N / kRows, ns, kRows}, at::kHalf);
  at::Tensor dmin = at::empty({six ? 0 : N / kRows, ns, kRows}, src.options().dtype(at::kHalf));
  const uint8_t* s = src.data_ptr<uint8_t>();
  uint8_t* o = w.data_ptr<uint8_t>();
  auto* osc = static_cast<uint8_t*>(sc.data_ptr());
  auto* od = reinterpret_cast<uint16_t*>(d.data_ptr());
  auto* odm = six ? nullptr : reinterpret_cast<uint16_t*>(dmin.data_ptr());
  const auto put = bits == 4 ? &put_super<4> : bits == 5 ? &put_super<5> : &put_super<6>;
  std::atomic<bool> finite{true};
  auto is_finite = [](uint16_t h) { return (h & 0x7C00) != 0x7C00; };
  at::parallel_for(0, N / kRows, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t si = 0; si < ns; ++si)
        for (int64_t r = 0; r < kRows; ++r) {
          const uint8_t* blk = s + ((p * kRows + r) * ns + si) * bytes;
          uint16_t dh, dmh = 0;
          std::memcpy(&dh, blk + (six ? 208 : 0), 2);
          if (!six) std::memcpy(&dmh, blk + 2, 2);
          if (!is_finite(dh) || !is_finite(dmh)) finite = false;
          od[(p * ns + si) * kRows + r] = dh;
          if (odm) odm[(p * ns + si) * kRows + r] = dmh;
          for (int j = 0; j < per_super; ++j)
            osc[((p * ns + si) * per_super + j) * kRows + r] = blk[scale_at + j];
          put(kind, blk, o + (p * nb + si * 8) * bits * 64, r);
        }
  });
  at::Tensor flag = at::empty({1}, src.options().dtype(at::kBool));
  flag[0] = finite.load();
  return {w, sc, d, dmin, flag};
}

// GGUF Q4_K / Q5_K / Q6_K blocks (N rows of K / 256 super-blocks) -> float32 (N, K) by
// gguf's own arithmetic, bit for bit its dequantizer: d * sc and dmin * m rounded first, then
// each product and difference rounded separately (no fused multiply-add). For the rows of a
// table looked up (QuantEmbedding) and for tensors read as float.
__attribute__((optimize("fp-contract=off")))
at::Tensor gguf_kdequantize(const at::Tensor& blocks, int64_t kind, int64_t N, int64_t K) {
  TORCH_CHECK(kind == kQ4K || kind == kQ5K || kind == kQ6K, "blocks must be Q4_K, Q5_K or Q6_K");
  TORCH_CHECK(K % kSuper == 0, "K must be a multiple of 256");
  const at::Tensor src = blocks.contiguous();
  TORCH_CHECK(src.scalar_type() == at::kByte && src.numel() == N * (K / kSuper) * super_bytes(kind),
              "blocks must be N * K / 256 GGUF super-blocks of uint8");
  at::Tensor out = at::empty({N, K}, src.options().dtype(at::kFloat));
  const uint8_t* s = src.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  const int64_t ns = K / kSuper, bytes = super_bytes(kind);
  const auto half = [](uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); };
  at::parallel_for(0, N, std::max<int64_t>(1, (1 << 16) / K), [&](int64_t r0, int64_t r1) {
    uint8_t sc[16], mn[8];
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t si = 0; si < ns; ++si) {
        const uint8_t* blk = s + (r * ns + si) * bytes;
        float* y = o + r * K + si * kSuper;
        uint16_t dh = 0, dmh = 0;
        super_scales(kind, blk, sc, mn, &dh, &dmh);
        const float d = half(dh), dmin = half(dmh);
        for (int i = 0; i < 256; ++i) {
          if (kind == kQ6K) {
            const int h = i / 128, q = (i % 128) / 32, l = i % 32;
            const int low = blk[64 * h + 32 * (q % 2) + l] >> (4 * (q / 2)) & 0x0F;
            const int top = blk[128 + 32 * h + l] >> (2 * q) & 3;
            const float d_sc = d * static_cast<float>(static_cast<int8_t>(sc[i / 16]));
            y[i] = d_sc * static_cast<float>((low | top << 4) - 32);
          } else {
            const int sub = i / 32, l = i % 32;
            int v = blk[(kind == kQ4K ? 16 : 48) + 32 * (sub / 2) + l] >> (4 * (sub % 2)) & 0x0F;
            if (kind == kQ5K) v |= (blk[16 + l] >> sub & 1) << 4;
            const float d_sc = d * static_cast<float>(sc[sub]);
            const float dm = dmin * static_cast<float>(mn[sub]);
            y[i] = d_sc * static_cast<float>(v) - dm;
          }
        }
      }
  });
  return out;
}

}  // namespace

namespace mistral7b {

void check_kweight(const QWeight& q, int64_t K) {
  TORCH_CHECK(q.bits >= 4 && q.bits <= 6 && q.super_d.has_value(), "a K-quant has 4 to 6 bits");
  const bool six = q.bits == 6;
  const int64_t N = q.n_out;
  TORCH_CHECK(N % kRows == 0 && K % kSuper == 0, "K-quants need N a multiple of 16, K of 256");
  TORCH_CHECK(q.group == (six ? 16 : 32), "K-quant sub-blocks are 16 (Q6_K) or 32 inputs");
  TORCH_CHECK(q.w.scalar_type() == at::kByte && q.w.is_contiguous() &&
                  q.w.numel() == N * K * q.bits / 8,
              "w must hold ", N * K * q.bits / 8, " contiguous bytes");
  TORCH_CHECK(q.scale.is_contiguous() && q.scale.element_size() == 1 &&
                  q.scale.numel() == N * (six ? K / 16 : K / kSuper * 12),
              "sub-block scales: the file's bytes, 16 (Q6_K) or 12 per super-block and row");
  TORCH_CHECK(!q.mins.has_value(), "K-quant mins are packed with their scales");
  const auto halves = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->scalar_type() == at::kHalf && t->is_contiguous() &&
           t->numel() == N * (K / kSuper);
  };
  TORCH_CHECK(halves(q.super_d) && (six || halves(q.super_min)),
              "d (and dmin) must be float16, one per super-block and row");
}

SpanFn kquant_span(int64_t bits) {
#if M7_X86
  return bits == 4 ? &kspan<4> : bits == 5 ? &kspan<5> : &kspan<6>;
#else
  return nullptr;
#endif
}

at::Tensor kqmm(const at::Tensor& x, const QWeight& q) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "x must be a contiguous 2-D float32 tensor");
  const int64_t M = x.size(0), K = x.size(1);
  check_kweight(q, K);
  at::Tensor y = at::empty({M, q.n_out}, x.options());
  if (M == 0) return y;
  ActBlocks acts;
  quantize_acts(x, kBlock, acts);
  const Product p{q.w.data_ptr<uint8_t>(), q.scale.data_ptr(), nullptr, q.super_d->data_ptr(),
                  q.super_min ? q.super_min->data_ptr() : nullptr, 0.0f, q.n_out, q.group,
                  y.data_ptr<float>(), &acts, kquant_span(q.bits)};
  at::parallel_for(0, q.n_out / kRows, 1, [&](int64_t p0, int64_t p1) { p.span(p, M, K, p0, p1); });
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
  m.def("gguf_kpanels(Tensor blocks, int kind, int n, int k) -> Tensor[]");
  m.def("gguf_kdequantize(Tensor blocks, int kind, int n, int k) -> Tensor");
  m.def("kqmm(Tensor x, Tensor w, Tensor scale, Tensor d, Tensor? dmin, int bits, "
        "int group, int n_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistral7b_qmm, CPU, m) {
  m.impl("gguf_kpanels", &gguf_kpanels);
  m.impl("gguf_kdequantize", &gguf_kdequantize);
  m.impl("kqmm", &kqmm_op);
}
