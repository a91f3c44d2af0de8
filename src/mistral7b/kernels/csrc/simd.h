// The vector operations our kernels are written in, for one instruction set: 16 float32 or
// int32 lanes (`VF`, `VI`; 64 bytes), one AVX-512 register or two AVX2 ones. Every kernel
// source is compiled twice (native.py), once with M7_ISA=512 and once with M7_ISA=2, and
// defines its kernels inside namespace M7_NS; the library picks one set at run time
// (kernels.h, mistral7b::isa()). So one text of each kernel serves both kinds of CPU, in the
// same panel layout, and the AVX-512 build is the instructions it always was.
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
// 16 bytes as floats: signed, unsigned
M7_TARGET inline VF f_from_i8(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); }
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

#else  // AVX2: each value two 256-bit halves, lanes 0..7 and 8..15

struct VF { __m256 l, h; };
struct VI { __m256i l, h; };
constexpr int kEightBias = 128;

M7_TARGET inline VF f_zero() { return VF{_mm256_setzero_ps(), _mm256_setzero_ps()}; }
M7_TARGET inline VF f_set1(float v) { const __m256 s = _mm256_set1_ps(v); return VF{s, s}; }
M7_TARGET inline VF f_load(const float* p) { return VF{_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
M7_TARGET inline void f_store(float* p, VF v) { _mm256_storeu_ps(p, v.l); _mm256_storeu_ps(p + 8, v.h); }
M7_TARGET inline VF f_add(VF a, VF b) { return VF{_mm256_add_ps(a.l, b.l), _mm256_add_ps(a.h, b.h)}; }
M7_TARGET inline VF f_sub(VF a, VF b) { return VF{_mm256_sub_ps(a.l, b.l), _mm256_sub_ps(a.h, b.h)}; }
M7_TARGET inline VF f_mul(VF a, VF b) { return VF{_mm256_mul_ps(a.l, b.l), _mm256_mul_ps(a.h, b.h)}; }
M7_TARGET inline VF f_max(VF a, VF b) { return VF{_mm256_max_ps(a.l, b.l), _mm256_max_ps(a.h, b.h)}; }
M7_TARGET inline VF f_fmadd(VF a, VF b, VF c) {
  return VF{_mm256_fmadd_ps(a.l, b.l, c.l), _mm256_fmadd_ps(a.h, b.h, c.h)};
}
M7_TARGET inline VF f_fnmadd(VF a, VF b, VF c) {
  return VF{_mm256_fnmadd_ps(a.l, b.l, c.l), _mm256_fnmadd_ps(a.h, b.h, c.h)};
}
M7_TARGET inline VF f_abs(VF a) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  return VF{_mm256_andnot_ps(sign, a.l), _mm256_andnot_ps(sign, a.h)};
}
M7_TARGET inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
M7_TARGET inline float f_sum(VF a) { return sum8(_mm256_add_ps(a.l, a.h)); }
M7_TARGET inline float f_hmax(VF a) {
  const __m256 m8 = _mm256_max_ps(a.l, a.h);
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
M7_TARGET inline VF f_from_i(VI a) { return VF{_mm256_cvtepi32_ps(a.l), _mm256_cvtepi32_ps(a.h)}; }
M7_TARGET inline VI f_round_i(VF a) { return VI{_mm256_cvtps_epi32(a.l), _mm256_cvtps_epi32(a.h)}; }
M7_TARGET inline VF f_round(VF a) {
  constexpr int kMode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return VF{_mm256_round_ps(a.l, kMode), _mm256_round_ps(a.h, kMode)};
}
M7_TARGET inline __m256 scale2_8(__m256 a, __m256 n) {  // 2^n built in the exponent bits
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(a, _mm256_castsi256_ps(e));
}
M7_TARGET inline VF f_scale2(VF a, VF n) { return VF{scale2_8(a.l, n.l), scale2_8(a.h, n.h)}; }
M7_TARGET inline VF f_first(VF a, int n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), count = _mm256_set1_epi32(n);
  const __m256 lo = _mm256_castsi256_ps(_mm256_cmpgt_epi32(count, lane));
  const __m256 hi = _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(count, _mm256_add_epi32(lane, _mm256_set1_epi32(8))));
  return VF{_mm256_and_ps(a.l, lo), _mm256_and_ps(a.h, hi)};
}
M7_TARGET inline VF f_load_first(const float* p, int n) {
  float buf[16] = {};
  std::memcpy(buf, p, sizeof(float) * n);
  return f_load(buf);
}
M7_TARGET inline void f_store_first(float* p, VF v, int n) {
  float buf[16];
  f_store(buf, v);
  std::memcpy(p, buf, sizeof(float) * n);
}
M7_TARGET inline VF f_load(const at::Half* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return VF{_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
}
M7_TARGET inline VF f_load(const at::BFloat16* p) {
  const __m128i* q = reinterpret_cast<const __m128i*>(p);
  return VF{_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q)), 16)),
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q + 1)), 16))};
}
M7_TARGET inline __m128i bf16_8(__m256 v) {  // round to nearest even, 8 bf16 values
  __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
  const __m256i packed = _mm256_packus_epi32(bits, bits);  // each half: 4 values twice
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}
M7_TARGET inline void f_store(at::BFloat16* p, VF v) {
  __m128i* q = reinterpret_cast<__m128i*>(p);
  _mm_storeu_si128(q, bf16_8(v.l));
  _mm_storeu_si128(q + 1, bf16_8(v.h));
}
M7_TARGET inline VF f_from_i8(__m128i b) {
  return VF{_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
}
M7_TARGET inline VF f_from_u8(__m128i b) {
  return VF{_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
}

M7_TARGET inline VI i_zero() { return VI{_mm256_setzero_si256(), _mm256_setzero_si256()}; }
M7_TARGET inline VI i_set1(int32_t v) { const __m256i s = _mm256_set1_epi32(v); return VI{s, s}; }
M7_TARGET inline VI i_set1_8(int8_t v) { const __m256i s = _mm256_set1_epi8(v); return VI{s, s}; }
M7_TARGET inline VI i_load(const void* p) {
  const __m256i* q = reinterpret_cast<const __m256i*>(p);
  return VI{_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)};
}
M7_TARGET inline void i_store(void* p, VI v) {
  __m256i* q = reinterpret_cast<__m256i*>(p);
  _mm256_storeu_si256(q, v.l);
  _mm256_storeu_si256(q + 1, v.h);
}
M7_TARGET inline VI i_add(VI a, VI b) { return VI{_mm256_add_epi32(a.l, b.l), _mm256_add_epi32(a.h, b.h)}; }
M7_TARGET inline VI i_sub(VI a, VI b) { return VI{_mm256_sub_epi32(a.l, b.l), _mm256_sub_epi32(a.h, b.h)}; }
M7_TARGET inline VI i_and(VI a, VI b) { return VI{_mm256_and_si256(a.l, b.l), _mm256_and_si256(a.h, b.h)}; }
M7_TARGET inline VI i_or(VI a, VI b) { return VI{_mm256_or_si256(a.l, b.l), _mm256_or_si256(a.h, b.h)}; }
M7_TARGET inline VI i_srl16(VI a, int n) { return VI{_mm256_srli_epi16(a.l, n), _mm256_srli_epi16(a.h, n)}; }
M7_TARGET inline VI i_sll16(VI a, int n) { return VI{_mm256_slli_epi16(a.l, n), _mm256_slli_epi16(a.h, n)}; }
M7_TARGET inline int32_t i_sum(VI a) {
  const __m256i s8 = _mm256_add_epi32(a.l, a.h);
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
M7_TARGET inline void i_store_i8(int8_t* p, VI a) {
  const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(a.l, a.h), 0xD8);  // 16 x int16
  const __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), b);
}
M7_TARGET inline __m256i dp8(__m256i acc, __m256i w, __m256i a) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1)));
}
// exact for w <= 127 (the header)
M7_TARGET inline VI dpbusd(VI acc, VI w, int32_t a) {
  const __m256i av = _mm256_set1_epi32(a);
  return VI{dp8(acc.l, w.l, av), dp8(acc.h, w.h, av)};
}
// for bytes u = q + 128: the sums of q a, |q| times a with q's sign (|q| <= 128 unsigned,
// a in -127..127: two products fit an int16)
M7_TARGET inline __m256i dps8(__m256i acc, __m256i u, __m256i a) {
  const __m256i q = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
  return dp8(acc, _mm256_abs_epi8(q), _mm256_sign_epi8(a, q));
}
M7_TARGET inline VI dot_signed(VI acc, VI w, int32_t a) {
  const __m256i av = _mm256_set1_epi32(a);
  return VI{dps8(acc.l, w.l, av), dps8(acc.h, w.h, av)};
}

#endif  // M7_ISA

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
    // up exactly in int16, so a block takes 2 vpmaddwd a half, not 8
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i lo = _mm256_setzero_si256(), hi = lo;
    for (int g = 0; g < 2; ++g) {
      __m256i pl = _mm256_setzero_si256(), ph = pl;
      for (int i = 4 * g; i < 4 * g + 4; ++i) {
        const __m256i a = _mm256_set1_epi32(v[(i % 2) * 4 + i / 2]);
        pl = _mm256_add_epi16(pl, _mm256_maddubs_epi16(wv[i].l, a));
        ph = _mm256_add_epi16(ph, _mm256_maddubs_epi16(wv[i].h, a));
      }
      lo = _mm256_add_epi32(lo, _mm256_madd_epi16(pl, ones));
      hi = _mm256_add_epi32(hi, _mm256_madd_epi16(ph, ones));
    }
    return VI{lo, hi};
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
