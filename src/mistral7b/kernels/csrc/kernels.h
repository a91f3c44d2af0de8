// What the files of this library call of each other (each op is also registered with
// PyTorch under mistral7b_qmm:: for Python).
#pragma once

// the light headers: the AVX2 build of a kernel source needs no more (M7_PRIMARY below)
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <optional>
#include <vector>

#if defined(__x86_64__)
#define M7_X86 1
#else
#define M7_X86 0
#endif

// Each kernel source is compiled twice (native.py): M7_ISA=512 (AVX-512 VNNI) and M7_ISA=2
// (AVX2), its kernels in namespace m7_avx512 or m7_avx2 (simd.h); what is not a kernel (the
// ops, their checks, the registration with PyTorch) only in the first build, M7_PRIMARY.
#ifndef M7_ISA
#define M7_ISA 512
#endif
#define M7_PRIMARY (M7_ISA == 512)

namespace mistral7b {

// The instruction set the kernels run on here: AVX-512 with VNNI where the CPU has it, else
// AVX2 (with FMA and F16C), else none (then native.py leaves the kernels unused).
// MISTRAL7B_ISA=avx2 picks AVX2 on an AVX-512 CPU (tests, benchmarks); read once.
enum class Isa { kNone = 0, kAvx2 = 2, kAvx512 = 512 };
Isa isa();   // qmm_ops.cpp
// An error naming `op` where isa() is kNone: every op checks this before M7_ON_ISA.
void check_isa(const char* op);

// The panel layout (qmm.cpp's header): output rows per panel, inputs per block.
constexpr int64_t kPanelRows = 16;
constexpr int64_t kBlockInputs = 32;

// With more than one tile of activation rows (pre-fill, a batch of decode rows), a few panels
// go through all the tiles together: about this many bytes of their weights (or unpacked
// values), kept in L2, so each tile's activations come from L3 once per few panels.
constexpr int64_t kGroupBytes = 256 << 10;

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
// scale * (sum of the block's values) `sg`, the plain integer sums of every 16 values `s16`,
// and `s32`: 8 x each block's sum (the 4-bit offset's term; qmm.cpp's block_panel).
// Laid out by tile (simd.h kMaxTile rows; the last tile holds the rest): a tile of T rows
// from row m starts where row m would (tile(): q at m K, a at m K / 32, ...), and within it
// each block (or group) has its T rows' entries in turn, so a kernel reads one tile through
// one pointer a field (q + (b T + t) 32, a[b T + t], sg[g T + t], s16[2 (b T + t) + half]).
// One row is plain row order.
struct ActBlocks {
  std::vector<int8_t> q;
  std::vector<float> a;
  std::vector<float> sg;
  std::vector<int32_t> s16;
  std::vector<int32_t> s32;

  // Where the tile of rows from row m starts in each field (K inputs, groups of G).
  struct Tile {
    const int8_t* q;
    const float *a, *sg;
    const int32_t *s16, *s32;
  };
  Tile tile(int64_t m, int64_t K, int64_t G) const {
    const int64_t blocks = K / kBlockInputs;
    return {q.data() + m * K, a.data() + m * blocks, sg.data() + m * (K / G),
            s16.data() + m * (K / 16), s32.data() + m * blocks};
  }
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

}  // namespace mistral7b

// Each instruction set's kernels (simd.h), called by the ops through M7_ON_ISA.
#define M7_ISA_ENTRY_POINTS                                                                   \
  void qmm_into(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,            \
                const std::optional<at::Tensor>& mins, int64_t bits, int64_t group,           \
                double offset, at::Tensor& y);                                                \
  void quantize_acts(const at::Tensor& x, int64_t G, mistral7b::ActBlocks& acts, int64_t span); \
  mistral7b::SpanFn qmm_span(bool half, int64_t bits, bool affine);                           \
  mistral7b::SpanFn kquant_span(int64_t bits);                                                \
  void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                  \
              const int64_t* slots, int64_t K, const bool* visible, at::Tensor& out);         \
  void rms_norm_rows(const float* x, const float* w, float* y, int64_t rows, int64_t D, float eps);
namespace m7_avx512 { M7_ISA_ENTRY_POINTS }
namespace m7_avx2 { M7_ISA_ENTRY_POINTS }
#define M7_ON_ISA(call) \
  (mistral7b::isa() == mistral7b::Isa::kAvx512 ? m7_avx512::call : m7_avx2::call)

namespace mistral7b {

// qmm_ops.cpp (qmm.cpp's ops): y = x @ W^T; qmm_many: several weights of one x in one
// parallel region
at::Tensor qmm(const at::Tensor& x, const QWeight& q);
std::vector<at::Tensor> qmm_many(const at::Tensor& x, const std::vector<const QWeight*>& ws);

// kquant.cpp: a K-quant weight's checks, its product, and its span for qmm_many
void check_kweight(const QWeight& q, int64_t K);
at::Tensor kqmm(const at::Tensor& x, const QWeight& q);

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
