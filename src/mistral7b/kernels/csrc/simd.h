// The vector operations our kernels are written in, for one instruction set: VF / VI hold
// kLanes float32 or int32 lanes, 16 in an AVX-512 register, 8 in an AVX2 one. Every kernel
// source is compiled twice (native.py), once with M7_ISA=512 and once with M7_ISA=2, and
// defines its kernels inside namespace M7_NS; the library picks one set at run time
// (kernels.h, mistral7b::isa()). So one text of each kernel serves both kinds of CPU over the
// same panel layout: a lane is a panel row, and AVX2 takes a panel's 16 rows in two parts of
// 8 (kParts), whose bytes are the first and second 32 of each 64-byte chunk. The AVX-512
// build is the instructions it always was (a loop of one part).
//
// AVX2 has no vpdpbusd: `dpbusd` multiplies bytes pairwise into int16 (vpmaddubsw) and those
// pairs into int32 (vpmaddwd), exact while the unsigned bytes are <= 127 (two products of at
// most 127 x 127 fit an int16): 4-, 5- and 6-bit values are. qmm's 8-bit panels (q + 128)
// take `dot_signed` there instead, which works on q itself (kEightBias says which).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#ifndef M7_ISA
#define M7_ISA 512
#endif

#if M7_ISA == 512
#define M7_NS m7_avx512
#define M7_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,f16c,fma")))
#elif M7_ISA == 2
#define M7_NS m7_avx2
#define M7_TARGET __attribute__((target("avx2,fma,f16c")))
#else
#error "M7_ISA must be 512 or 2"
#endif

#if defined(__x86_64__)
namespace M7_NS {

#if M7_ISA == 512

using VF = __m512;
using VI = __m512i;
constexpr int kLanes = 16;  // lanes per register: a panel's 16 rows at once
// an 8-bit block_dot sums (u - kEightBias) v for the stored bytes u = q + 128
constexpr int kEightBias = 0;

M7_TARGET inline VF f_zero() { return _mm512_setzero_ps(); }
M7_TARGET inline VF f_set1(float v) { return _mm512_set1_ps(v); }
M7_TARGET inline VF f_load(const float* p) { return _mm512_loadu_ps(p); }
M7_TARGET inline void f_store(float* p, VF v) { _mm512_storeu_ps(p, v); }
M7_TARGET inline VF f_add(VF a, VF b) { return _mm512_add_ps(a, b); }
M7_TARGET inline VF f_sub(VF a, VF b) { return _mm512_sub_ps(a, b); }
M7_TARGET inline VF f_mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
M7_TARGET inline VF f_max(VF a, VF b) { return _mm512_max_ps(a, b); }
M7_TARGET inline VF f_fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
M7_TARGET inline VF f_fnmadd(VF a, VF b, VF c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
M7_TARGET inline VF f_abs(VF a) { return _mm512_andnot_ps(_mm512_set1_ps(-0.0f), a); }
M7_TARGET inline float f_sum(VF a) { return _mm512_reduce_add_ps(a); }
M7_TARGET inline float f_hmax(VF a) { return _mm512_reduce_max_ps(a); }
M7_TARGET inline VF f_from_i(VI a) { return _mm512_cvtepi32_ps(a); }
M7_TARGET inline VI f_round_i(VF a) { return _mm512_cvtps_epi32(a); }  // nearest, ties even
M7_TARGET inline VF f_round(VF a) {
  return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// a 2^n for integral n in -126 .. 0
M7_TARGET inline VF f_scale2(VF a, VF n) { return _mm512_scalef_ps(a, n); }
// lanes n.. zeroed; loads and stores of the first n lanes (n < 16)
M7_TARGET inline VF f_first(VF a, int n) {
  return _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << n) - 1), a);
}
M7_TARGET inline VF f_load_first(const float* p, int n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
M7_TARGET inline void f_store_first(float* p, VF v, int n) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
}
M7_TARGET inline VF f_load(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
M7_TARGET inline VF f_load(const at::BFloat16* p) {  // bf16 is float32's top half
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
M7_TARGET inline void f_store(at::BFloat16* p, VF v) {  // round to nearest even
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
// kLanes bytes at p as floats: signed; 16 bytes' first kLanes, unsigned
M7_TARGET inline VF f_from_i8(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
M7_TARGET inline VF f_from_u8(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }

M7_TARGET inline VI i_zero() { return _mm512_setzero_si512(); }
M7_TARGET inline VI i_set1(int32_t v) { return _mm512_set1_epi32(v); }
M7_TARGET inline VI i_set1_8(int8_t v) { return _mm512_set1_epi8(v); }
M7_TARGET inline VI i_load(const void* p) { return _mm512_loadu_si512(p); }
M7_TARGET inline void i_store(void* p, VI v) { _mm512_storeu_si512(p, v); }
M7_TARGET inline VI i_add(VI a, VI b) { return _mm512_add_epi32(a, b); }
M7_TARGET inline VI i_sub(VI a, VI b) { return _mm512_sub_epi32(a, b); }
M7_TARGET inline VI i_and(VI a, VI b) { return _mm512_and_si512(a, b); }
M7_TARGET inline VI i_or(VI a, VI b) { return _mm512_or_si512(a, b); }
M7_TARGET inline VI i_srl16(VI a, int n) { return _mm512_srli_epi16(a, n); }
M7_TARGET inline VI i_sll16(VI a, int n) { return _mm512_slli_epi16(a, n); }
M7_TARGET inline VI i_sll32(VI a, int n) { return _mm512_slli_epi32(a, n); }
M7_TARGET inline int32_t i_sum(VI a) { return _mm512_reduce_add_epi32(a); }
// 16 int32 within int8's range to 16 bytes at p
M7_TARGET inline void i_store_i8(int8_t* p, VI a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(a));
}
// acc + per int32 lane the four products of unsigned bytes of w with signed bytes of `a`
M7_TARGET inline VI dpbusd(VI acc, VI w, int32_t a) {
  return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(a));
}
M7_TARGET inline VI dot_signed(VI acc, VI w, int32_t a) { return dpbusd(acc, w, a); }
// acc + the products of two registers of values <= 63 (6-bit) with their broadcast dwords
M7_TARGET inline VI dpbusd2(VI acc, VI w0, int32_t a0, VI w1, int32_t a1) {
  return dpbusd(dpbusd(acc, w0, a0), w1, a1);
}

#else  // AVX2: 8 lanes; a panel's 16 rows are taken in two halves (kLanes)

using VF = __m256;
using VI = __m256i;
constexpr int kLanes = 8;
constexpr int kEightBias = 128;

M7_TARGET inline VF f_zero() { return _mm256_setzero_ps(); }
M7_TARGET inline VF f_set1(float v) { return _mm256_set1_ps(v); }
M7_TARGET inline VF f_load(const float* p) { return _mm256_loadu_ps(p); }
M7_TARGET inline void f_store(float* p, VF v) { _mm256_storeu_ps(p, v); }
M7_TARGET inline VF f_add(VF a, VF b) { return _mm256_add_ps(a, b); }
M7_TARGET inline VF f_sub(VF a, VF b) { return _mm256_sub_ps(a, b); }
M7_TARGET inline VF f_mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
M7_TARGET inline VF f_max(VF a, VF b) { return _mm256_max_ps(a, b); }
M7_TARGET inline VF f_fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
M7_TARGET inline VF f_fnmadd(VF a, VF b, VF c) { return _mm256_fnmadd_ps(a, b, c); }
M7_TARGET inline VF f_abs(VF a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
M7_TARGET inline float f_sum(VF v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
M7_TARGET inline float f_hmax(VF v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
M7_TARGET inline VF f_from_i(VI a) { return _mm256_cvtepi32_ps(a); }
M7_TARGET inline VI f_round_i(VF a) { return _mm256_cvtps_epi32(a); }
M7_TARGET inline VF f_round(VF a) {
  return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
M7_TARGET inline VF f_scale2(VF a, VF n) {  // 2^n built in the exponent bits
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(a, _mm256_castsi256_ps(e));
}
M7_TARGET inline VF f_first(VF a, int n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane)));
}
M7_TARGET inline VF f_load_first(const float* p, int n) {
  float buf[kLanes] = {};
  std::memcpy(buf, p, sizeof(float) * n);
  return f_load(buf);
}
M7_TARGET inline void f_store_first(float* p, VF v, int n) {
  float buf[kLanes];
  f_store(buf, v);
  std::memcpy(p, buf, sizeof(float) * n);
}
M7_TARGET inline VF f_load(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
M7_TARGET inline VF f_load(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
M7_TARGET inline void f_store(at::BFloat16* p, VF v) {  // round to nearest even
  __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
  const __m256i packed = _mm256_packus_epi32(bits, bits);  // per 128-bit lane: 4 values twice
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08)));
}
// kLanes bytes at p as floats: signed; 16 bytes' first kLanes, unsigned
M7_TARGET inline VF f_from_i8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
M7_TARGET inline VF f_from_u8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }

M7_TARGET inline VI i_zero() { return _mm256_setzero_si256(); }
M7_TARGET inline VI i_set1(int32_t v) { return _mm256_set1_epi32(v); }
M7_TARGET inline VI i_set1_8(int8_t v) { return _mm256_set1_epi8(v); }
M7_TARGET inline VI i_load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
M7_TARGET inline void i_store(void* p, VI v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
M7_TARGET inline VI i_add(VI a, VI b) { return _mm256_add_epi32(a, b); }
M7_TARGET inline VI i_sub(VI a, VI b) { return _mm256_sub_epi32(a, b); }
M7_TARGET inline VI i_and(VI a, VI b) { return _mm256_and_si256(a, b); }
M7_TARGET inline VI i_or(VI a, VI b) { return _mm256_or_si256(a, b); }
M7_TARGET inline VI i_srl16(VI a, int n) { return _mm256_srli_epi16(a, n); }
M7_TARGET inline VI i_sll16(VI a, int n) { return _mm256_slli_epi16(a, n); }
M7_TARGET inline VI i_sll32(VI a, int n) { return _mm256_slli_epi32(a, n); }
M7_TARGET inline int32_t i_sum(VI a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
M7_TARGET inline void i_store_i8(int8_t* p, VI a) {
  const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w16, w16));
}
M7_TARGET inline VI dpbusd_abs(VI acc, VI w, VI a) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1)));
}
// exact for w <= 127 (the header)
M7_TARGET inline VI dpbusd(VI acc, VI w, int32_t a) { return dpbusd_abs(acc, w, _mm256_set1_epi32(a)); }
// two registers of values <= 63: their pair sums (|.| <= 63 x 127 x 2 each) add up in int16
M7_TARGET inline VI dpbusd2(VI acc, VI w0, int32_t a0, VI w1, int32_t a1) {
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(w0, _mm256_set1_epi32(a0)),
                                     _mm256_maddubs_epi16(w1, _mm256_set1_epi32(a1)));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
// for bytes u = q + 128: the sums of q a, |q| times a with q's sign (|q| <= 128 unsigned,
// a in -127..127: two products fit an int16)
M7_TARGET inline VI dot_signed(VI acc, VI u, int32_t a) {
  const __m256i q = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
  return dpbusd_abs(acc, _mm256_abs_epi8(q), _mm256_sign_epi8(_mm256_set1_epi32(a), q));
}

#endif  // M7_ISA

// A panel's rows (kernels.h) in registers of kLanes rows: its parts, 1 or 2
constexpr int64_t kParts = mistral7b::kPanelRows / kLanes;
// The parts a kernel takes in one pass over a panel's blocks: with up to 2 activation rows
// (decode; two clients, a one-token draft) all of them, so each cache line is used whole as
// it arrives (AVX2's parts are the halves of every line); larger tiles one part a pass
// (their accumulators fill the registers: at 4 rows taking both parts gained nothing).
// Each row's arithmetic is the same either way. AVX2, 14336 x 4096 at 2 rows, 2 threads:
// int4 g32 1.82-1.87 -> 1.36-1.40 ms (bench/bench_kernels.py --rows 2).
template <int T>
constexpr int64_t kTogether = T * kParts <= 4 ? kParts : 1;

// Activation rows that share one unpacked weight block (a tile; qmm, kquant). AVX2 takes 4:
// its 16 registers hold a block's 8 value registers and 4 accumulators, where 8 spill
// (7B Q4_0 projections at 64 rows, 1 thread: best 143-146 against 132-134 GOP/s,
// bench/bench_kernels.py --model); AVX-512's 32 registers hold 8.
constexpr int kMaxTile = kLanes == 8 ? 4 : 8;

// f(std::integral_constant<int, T>{}) for the tile height T = n (1 .. kMaxTile), so that a
// kernel's rows are a compile-time count (unrolled loops, accumulators in registers)
template <int T = kMaxTile, typename F>
inline void with_tile(int64_t n, F&& f) {
  if constexpr (T == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    if (n >= T) return f(std::integral_constant<int, T>{});
    with_tile<T - 1>(n, std::forward<F>(f));
  }
}

// Sums across 16 lanes (attention.cpp, norm.cpp) are taken over kWide registers, added in
// AVX-512's order (_mm512_reduce_add_ps: the 256-bit halves, then 128, then pairs), so both
// instruction sets give the same bits.
constexpr int kWide = 16 / kLanes;
M7_TARGET inline float f_sum16(const VF* acc) {
  VF s = acc[0];
  for (int c = 1; c < kWide; ++c) s = f_add(s, acc[c]);
  return f_sum(s);
}

// sum a[i] b[i] over i < n: 16 lanes of fused multiply-adds, summed by f_sum16, then the
// tail of n % 16 one by one (attention's q . k, RMSNorm's sum of squares)
template <typename E>
M7_TARGET inline float f_dot(const float* a, const E* b, int64_t n) {
  VF acc[kWide];
  for (int c = 0; c < kWide; ++c) acc[c] = f_zero();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int c = 0; c < kWide; ++c)
      acc[c] = f_fmadd(f_load(a + i + c * kLanes), f_load(b + i + c * kLanes), acc[c]);
  float s = f_sum16(acc);
  for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

// Decode streams the weights: the kernels ask for the `lines` cache lines at p, a few blocks
// ahead of the one they multiply (the unpacking between loads leaves too few misses in flight
// for the hardware prefetcher alone: a 14336 x 4096 Q6_K product read 16.4 GB/s without, 37.9
// with, bench/bench_kernels.py; past a panel's end these are the next panel's lines).
constexpr int64_t kPrefetchBlocks = 8;  // how far ahead, in blocks of 32 inputs
inline void prefetch_lines(const uint8_t* p, int lines) {
  for (int l = 0; l < lines; ++l) _mm_prefetch(reinterpret_cast<const char*>(p + 64 * l), _MM_HINT_T0);
}

// The 4 x 64 bytes of a block's nibbles as 8 registers of values 0..15: register 2j holds the
// low nibbles of chunk j, 2j + 1 the high ones (qmm.cpp's header: value 4j + t, 16 + 4j + t).
// wb points at the block plus 4 r0 for the part of rows from r0 (AVX2: the chunks' halves).
M7_TARGET inline void unpack_nibbles(const uint8_t* wb, VI wv[8]) {
  const VI low4 = i_set1_8(0x0F);
  for (int j = 0; j < 4; ++j) {
    const VI v = i_load(wb + 64 * j);
    wv[2 * j] = i_and(v, low4);
    wv[2 * j + 1] = i_and(i_srl16(v, 4), low4);
  }
}

// The int32 dot products of a block's 8 value registers with one activation row's 32 int8
// values at q, in kChains independent chains (one chain of 8 dependent vpdpbusd would wait
// on their latency, ~5 cycles each, not on memory). Register i pairs with activation dword
// (i % 2) * 4 + i / 2 (4-bit pairing: low nibbles with bytes 4j.., high with 16 + 4j..), or
// with dword i where `nibbles` is false (8-bit panels: then the sums are of u - kEightBias).
// With `nibbles` the values must be <= 31 (4- and 5-bit; AVX2 sums four products in int16).
template <bool nibbles, int kChains>
M7_TARGET inline VI block_dot(const VI wv[8], const int8_t* q) {
  const int32_t* v = reinterpret_cast<const int32_t*>(q);
#if M7_ISA == 2
  if constexpr (nibbles) {
    // values <= 31 (4- and 5-bit): four vpmaddubsw pair sums (each |.| <= 31 x 127 x 2) add
    // up exactly in int16, so a block takes 2 vpmaddwd, not 8
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i sum = _mm256_setzero_si256();
    for (int g = 0; g < 2; ++g) {
      __m256i p = _mm256_maddubs_epi16(wv[4 * g], _mm256_set1_epi32(v[4 * g / 2]));
      for (int i = 4 * g + 1; i < 4 * g + 4; ++i)
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(wv[i], _mm256_set1_epi32(v[(i % 2) * 4 + i / 2])));
      sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, ones));
    }
    return sum;
  }
#endif
  VI sums[kChains];
  for (int c = 0; c < kChains; ++c) sums[c] = i_zero();
  for (int i = 0; i < 8; ++i) {
    const int dword = nibbles ? (i % 2) * 4 + i / 2 : i;
    sums[i % kChains] = nibbles ? dpbusd(sums[i % kChains], wv[i], v[dword])
                                : dot_signed(sums[i % kChains], wv[i], v[dword]);
  }
  for (int c = 1; c < kChains; ++c) sums[0] = i_add(sums[0], sums[c]);
  return sums[0];
}

}  // namespace M7_NS
#endif  // __x86_64__
