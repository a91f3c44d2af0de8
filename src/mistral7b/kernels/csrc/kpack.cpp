// GGUF K-quant blocks (Q4_K, Q5_K, Q6_K) into the panels kquant.cpp's kernel reads (its header
// describes both layouts), by whole 32-bit words; and the blocks dequantized to float32 by
// gguf's own arithmetic.

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
constexpr int64_t kSuper = mistral7b::kSuperInputs;
constexpr int64_t kQ4K = mistral7b::kGgmlQ4K, kQ5K = mistral7b::kGgmlQ5K, kQ6K = mistral7b::kGgmlQ6K;

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
  TORCH_CHECK(src.scalar_type() == at::kByte && src.numel() == N * (K / kSuper) * mistral7b::kquant_super_bytes(kind),
              "blocks must be N * K / 256 GGUF super-blocks of uint8");
  const int bits = mistral7b::kquant_bits(kind);
  const bool six = kind == kQ6K;
  const int64_t nb = K / kBlock, ns = K / kSuper, per_super = six ? 16 : 12;
  const int64_t bytes = mistral7b::kquant_super_bytes(kind), scale_at = six ? 192 : 4;
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
  TORCH_CHECK(src.scalar_type() == at::kByte && src.numel() == N * (K / kSuper) * mistral7b::kquant_super_bytes(kind),
              "blocks must be N * K / 256 GGUF super-blocks of uint8");
  at::Tensor out = at::empty({N, K}, src.options().dtype(at::kFloat));
  const uint8_t* s = src.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  const int64_t ns = K / kSuper, bytes = mistral7b::kquant_super_bytes(kind);
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

TORCH_LIBRARY_FRAGMENT(mistral7b_qmm, m) {
  m.def("gguf_kpanels(Tensor blocks, int kind, int n, int k) -> Tensor[]");
  m.def("gguf_kdequantize(Tensor blocks, int kind, int n, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistral7b_qmm, CPU, m) {
  m.impl("gguf_kpanels", &gguf_kpanels);
  m.impl("gguf_kdequantize", &gguf_kdequantize);
}
