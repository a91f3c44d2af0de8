// What the files of this library call of each other (each op is also registered with
// PyTorch under mistral7b_qmm:: for Python).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define M7_X86 1
#define M7_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,f16c,fma")))
#else
#define M7_X86 0
#define M7_TARGET
#endif

namespace mistral7b {

// The panel layout (qmm.cpp's header): output rows per panel, inputs per block.
constexpr int64_t kPanelRows = 16;
constexpr int64_t kBlockInputs = 32;

#if M7_X86
// Decode streams the weights: the kernels ask for the `lines` cache lines at p, a few blocks
// ahead of the one they multiply (the unpacking between loads leaves too few misses in flight
// for the hardware prefetcher alone: a 14336 x 4096 Q6_K product read 16.4 GB/s without, 37.9
// with, bench/bench_kernels.py; past a panel's end these are the next panel's lines).
constexpr int64_t kPrefetchBlocks = 8;  // how far ahead, in blocks of 32 inputs
inline void prefetch_lines(const uint8_t* p, int lines) {
  for (int l = 0; l < lines; ++l) _mm_prefetch(reinterpret_cast<const char*>(p + 64 * l), _MM_HINT_T0);
}

// With more than one tile of activation rows (pre-fill, a batch of decode rows), a few panels
// go through all the tiles together: about this many bytes of their weights (or unpacked
// values), kept in L2, so each tile's activations come from L3 once per few panels.
constexpr int64_t kGroupBytes = 256 << 10;

// The 4 x 64 bytes of a block's nibbles as 8 registers of values 0..15: register 2j holds the
// low nibbles of chunk j, 2j + 1 the high ones (qmm.cpp's header: value 4j + t, 16 + 4j + t).
M7_TARGET inline void unpack_nibbles(const uint8_t* wb, __m512i wv[8]) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int j = 0; j < 4; ++j) {
    const __m512i v = _mm512_loadu_si512(wb + 64 * j);
    wv[2 * j] = _mm512_and_si512(v, low4);
    wv[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
  }
}

// The int32 dot products of a block's 8 value registers with one activation row's 32 int8
// values at q, in kChains independent chains (one chain of 8 dependent vpdpbusd would wait
// on their latency, ~5 cycles each, not on memory). Register i pairs with activation dword
// (i % 2) * 4 + i / 2 (4-bit pairing: low nibbles with bytes 4j.., high with 16 + 4j..), or
// with dword i where `nibbles` is false (8-bit panels).
template <bool nibbles, int kChains>
M7_TARGET inline __m512i block_dot(const __m512i wv[8], const int8_t* q) {
  const int32_t* v = reinterpret_cast<const int32_t*>(q);
  __m512i sums[kChains];
  for (int c = 0; c < kChains; ++c) sums[c] = _mm512_setzero_si512();
  for (int i = 0; i < 8; ++i) {
    const int dword = nibbles ? (i % 2) * 4 + i / 2 : i;
    sums[i % kChains] = _mm512_dpbusd_epi32(sums[i % kChains], wv[i], _mm512_set1_epi32(v[dword]));
  }
  for (int c = 1; c < kChains; ++c) sums[0] = _mm512_add_epi32(sums[0], sums[c]);
  return sums[0];
}
#endif

// One weight in our panels (qmm.cpp's header comment): w = d * q + m per group of inputs.
// A K-quant (kquant.cpp's header) has its float16 super-block factors in super_d (and
// super_min for Q4_K / Q5_K); then `scale` / `mins` are its 8-bit sub-block scales and mins,
// `group` the sub-block's size and `bits` 4, 5 or 6.
struct QWeight {
  at::Tensor w, scale;
  std::optional<at::Tensor> mins;
  int64_t bits = 0, group = 0, n_out = 0;
  double offset = 0.0;
  std::optional<at::Tensor> super_d, super_min;
};

// ggml's K-quants (kquant.cpp's header): type ids, values per super-block, their bits per
// value and bytes per super-block.
constexpr int64_t kGgmlQ4K = 12, kGgmlQ5K = 13, kGgmlQ6K = 14, kSuperInputs = 256;
inline int64_t kquant_bits(int64_t kind) { return kind == kGgmlQ4K ? 4 : kind == kGgmlQ5K ? 5 : 6; }
inline int64_t kquant_super_bytes(int64_t kind) {
  return kind == kGgmlQ4K ? 144 : kind == kGgmlQ5K ? 176 : 210;
}

// Activation rows quantized to int8 in blocks of 32 (qmm.cpp): the values `q`, the scale `a`
// of each block (one scale shared by every block of a span: 32 inputs, or a K-quant's
// super-block of 256 as ggml's Q8_K), per group of G inputs the sum over its blocks of
// scale * (sum of the block's values) `sg`, and the plain integer sum of every 16 values `s16`.
struct ActBlocks {
  std::vector<int8_t> q;
  std::vector<float> a;
  std::vector<float> sg;
  std::vector<int32_t> s16;
};

// x (M, K) float32 or bfloat16, contiguous
void quantize_acts(const at::Tensor& x, int64_t G, ActBlocks& acts, int64_t span = kBlockInputs);

// One weight's part of a product of several weights with one x (qmm_many): `span` computes
// its panels p0 .. p1 - 1 for the M rows of `acts` into y.
struct Product {
  const uint8_t* w;
  const void* scale;
  const void* mins;
  const void* super_d;
  const void* super_min;
  float offset;
  int64_t N, G;
  float* y;
  const ActBlocks* acts;
  void (*span)(const Product&, int64_t M, int64_t K, int64_t p0, int64_t p1);
};
using SpanFn = decltype(Product::span);

// qmm.cpp: y = x @ W^T; qmm_many: several weights of one x in one parallel region
at::Tensor qmm(const at::Tensor& x, const QWeight& q);
std::vector<at::Tensor> qmm_many(const at::Tensor& x, const std::vector<const QWeight*>& ws);

// kquant.cpp: a K-quant weight's checks, its product, and its span for qmm_many
void check_kweight(const QWeight& q, int64_t K);
at::Tensor kqmm(const at::Tensor& x, const QWeight& q);
SpanFn kquant_span(int64_t bits);

// attention.cpp: decode attention read from one layer of the paged pool
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& gather, int64_t start, int64_t stop,
                           const std::optional<at::Tensor>& mask);

// pack.cpp: an empty tensor for weights (with MISTRAL7B_HUGE_PAGES=1 its whole 2 MiB pages
// are advised for huge pages)
at::Tensor weight_empty(at::IntArrayRef sizes, at::ScalarType dtype);

// norm.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);

}  // namespace mistral7b
