// Weights into the panel layout that qmm.cpp's kernel reads (its header describes it): from
// the portable int4/int8 form (pack4, pack8), and straight from GGUF Q4_0 / Q4_1 / Q8_0 blocks
// in one pass (gguf_panels), plus those blocks dequantized to float32 (gguf_dequantize).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace mistral7b {

// Decode reads every weight once per token, front to back. On 4 KiB pages that stream costs a
// TLB miss every 4 KiB, and in a virtual machine each miss is a two-level page walk. With
// MISTRAL7B_HUGE_PAGES=1, weights get their own mapping whose 2 MiB-aligned interior is advised
// for huge pages (honoured when transparent huge pages are in "madvise" or "always" mode). On
// the project's VMs a 14336 x 4096 int4 product ran 14% faster that way (1.25-1.35 against
// 1.45-1.59 ms, alternating in one process), but whole-model decode showed no gain beyond the
// runs' noise, while load took ~3 s longer for 7B: fresh 2 MiB pages fault in at ~0.5 GB/s
// there. So it is off by default. Only whole 2 MiB pages inside the tensor's bytes are
// advised, so nothing beyond them is ever committed; small tensors and a failed mapping take
// PyTorch's allocator.
at::Tensor weight_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * at::elementSize(dtype);
  constexpr size_t kHuge = size_t{2} << 20, kPage = 4096;
  static const bool wanted = [] {
    const char* v = std::getenv("MISTRAL7B_HUGE_PAGES");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  if (!wanted || nbytes < 2 * kHuge) return at::empty(sizes, at::dtype(dtype));
  const size_t len = (nbytes + kPage - 1) & ~(kPage - 1);
  const size_t span = len + kHuge;  // room to move the start to a 2 MiB boundary
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return at::empty(sizes, at::dtype(dtype));
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = (base + kHuge - 1) & ~(kHuge - 1);
  if (start > base) munmap(raw, start - base);  // address space only: never touched
  if (base + span > start + len) munmap(reinterpret_cast<void*>(start + len), base + span - start - len);
  void* p = reinterpret_cast<void*>(start);
  madvise(p, nbytes & ~(kHuge - 1), MADV_HUGEPAGE);
  return at::from_blob(p, sizes, [len](void* q) { munmap(q, len); }, at::dtype(dtype));
}

}  // namespace mistral7b

namespace {

constexpr int64_t kBlock = mistral7b::kBlockInputs;
constexpr int64_t kRows = mistral7b::kPanelRows;

// Fills the panel layout of an (N, K) weight, BITS per value: chunk j (0 .. BITS - 1) of each
// 32-input block holds, for row r, the 4 bytes byte(row, k0 + 4j .. k0 + 4j + 3) where `byte`
// gives what the kernel reads at (row, first input of the block, chunk j, byte t).
template <int BITS, typename Byte>
at::Tensor fill_panels(int64_t N, int64_t K, Byte byte) {
  TORCH_CHECK(N % kRows == 0 && K % kBlock == 0, "N must be a multiple of 16, K of 32");
  constexpr int kChunks = BITS;              // 64-byte chunks per block of 16 rows
  at::Tensor out = mistral7b::weight_empty({N * K * BITS / 8}, at::kByte);
  uint8_t* o = out.data_ptr<uint8_t>();
  const int64_t n_blocks = K / kBlock;
  at::parallel_for(0, N / kRows, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t b = 0; b < n_blocks; ++b) {
        uint8_t* ob = o + (p * n_blocks + b) * kChunks * 64;
        for (int64_t r = 0; r < kRows; ++r)
          for (int j = 0; j < kChunks; ++j)
            for (int t = 0; t < 4; ++t)
              ob[64 * j + 4 * r + t] = byte(p * kRows + r, b * kBlock, j, t);
      }
  });
  return out;
}

// Portable 4-bit weights (N, K/2), low nibble = column 2i, high = column 2i + 1, values 0..15
// -> the panel layout above.
at::Tensor pack4(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte, "q must be (N, K/2) uint8");
  at::Tensor src = q.contiguous();
  const int64_t half_k = src.size(1);
  const uint8_t* s = src.data_ptr<uint8_t>();
  return fill_panels<4>(src.size(0), half_k * 2, [=](int64_t n, int64_t k0, int j, int t) {
    auto value = [&](int64_t k) { return (s[n * half_k + k / 2] >> (4 * (k % 2))) & 0x0F; };
    return static_cast<uint8_t>(value(k0 + 4 * j + t) | (value(k0 + 16 + 4 * j + t) << 4));
  });
}

// int8 weights (N, K) -> the 8-bit panel layout (values stored + 128).
at::Tensor pack8(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar, "q must be (N, K) int8");
  at::Tensor src = q.contiguous();
  const int64_t K = src.size(1);
  const int8_t* s = src.data_ptr<int8_t>();
  return fill_panels<8>(src.size(0), K, [=](int64_t n, int64_t k0, int j, int t) {
    return static_cast<uint8_t>(s[n * K + k0 + 4 * j + t] + 128);
  });
}

// Bytes of one GGUF block of 32 values: Q4_0 (kind 2), Q4_1 (3), Q8_0 (8).
int64_t gguf_block_bytes(int64_t kind) { return kind == 2 ? 18 : kind == 3 ? 20 : 34; }

// `blocks` as N rows of K / 32 blocks of that kind, contiguous uint8 (checked).
at::Tensor checked_blocks(const at::Tensor& blocks, int64_t kind, int64_t N, int64_t K) {
  TORCH_CHECK(kind == 2 || kind == 3 || kind == 8, "GGUF blocks must be Q4_0, Q4_1 or Q8_0");
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32");
  at::Tensor src = blocks.contiguous();
  TORCH_CHECK(src.scalar_type() == at::kByte &&
                  src.numel() == N * (K / kBlock) * gguf_block_bytes(kind),
              "blocks must be N * K / 32 GGUF blocks of uint8");
  return src;
}

// GGUF blocks (rows of `blocks`, each row K / 32 blocks) -> panels, scales and mins in one
// pass, without the portable form (quant/gguf_import.py's rules give the same values).
// kind 2 = Q4_0 (18-byte block: f16 d, 16 bytes), 3 = Q4_1 (20: f16 d, f16 m, 16 bytes),
// 8 = Q8_0 (34: f16 d, 32 int8). A Q4 block's byte i holds element i in its low nibble and
// element 16 + i in its high one: exactly the panel byte (chunk j, byte t) for i = 4j + t,
// so the 4-bit repack is a transpose of 4-byte words. Scales and mins keep their float16
// bits; Q4_0's min (-8 d) is not stored (offset 8), as pack_int4 does. The fourth tensor
// holds three flags for the caller's choice of form: every scale finite and below 65000,
// every min so, and every min exactly -8 times its scale (then they need not be stored).
std::vector<at::Tensor> gguf_panels(const at::Tensor& blocks, int64_t kind, int64_t N,
                                    int64_t K) {
  TORCH_CHECK(N % kRows == 0, "N must be a multiple of 16");
  const at::Tensor src = checked_blocks(blocks, kind, N, K);
  const int64_t block_bytes = gguf_block_bytes(kind), nb = K / kBlock;
  const uint8_t* s = src.data_ptr<uint8_t>();
  const int bits = kind == 8 ? 8 : 4;
  at::Tensor w = mistral7b::weight_empty({N * K * bits / 8}, at::kByte);
  at::Tensor scale = mistral7b::weight_empty({N / kRows, nb, kRows}, at::kHalf);
  // Q4_0 / Q8_0 store no mins: an empty tensor (an op's Tensor[] cannot hold an undefined one)
  at::Tensor mins = at::empty({kind == 3 ? N / kRows : 0, nb, kRows}, src.options().dtype(at::kHalf));
  uint8_t* o = w.data_ptr<uint8_t>();
  uint16_t* sc = reinterpret_cast<uint16_t*>(scale.data_ptr());
  uint16_t* mn = kind == 3 ? reinterpret_cast<uint16_t*>(mins.data_ptr()) : nullptr;
  const int64_t data_at = kind == 3 ? 4 : 2;
  // f16 bit patterns: magnitude <= 64992 (the largest below 65000), and finite
  auto small = [](uint16_t h) { return (h & 0x7FFF) <= 0x7BEF; };
  std::atomic<bool> scales_ok{true}, mins_ok{true}, symmetric{true};
  // At least 1 MB of panels per thread: a small tensor is copied faster than a parallel
  // region starts, and on a busy machine a region waits for its slowest thread.
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / (nb * bits * 64));
  at::parallel_for(0, N / kRows, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* ob = o + (p * nb + b) * bits * 64;
        const int64_t at_scale = (p * nb + b) * kRows;
        for (int64_t r = 0; r < kRows; ++r) {
          const uint8_t* blk = s + ((p * kRows + r) * nb + b) * block_bytes;
          uint16_t d, m;
          std::memcpy(&d, blk, 2);
          sc[at_scale + r] = d;
          if (!small(d)) scales_ok = false;
          if (mn) {
            std::memcpy(&m, blk + 2, 2);
            mn[at_scale + r] = m;
            if (!small(m)) mins_ok = false;
            if (static_cast<float>(c10::Half(m, c10::Half::from_bits())) !=
                -8.0f * static_cast<float>(c10::Half(d, c10::Half::from_bits())))
              symmetric = false;
          }
          const uint8_t* q = blk + data_at;
          for (int j = 0; j < bits; ++j) {
            if (bits == 4) {
              std::memcpy(ob + 64 * j + 4 * r, q + 4 * j, 4);
            } else {
              for (int t = 0; t < 4; ++t) ob[64 * j + 4 * r + t] = q[4 * j + t] ^ 0x80;
            }
          }
        }
      }
  });
  at::Tensor flags = at::empty({3}, src.options().dtype(at::kBool));
  flags[0] = scales_ok.load();
  flags[1] = mins_ok.load();
  flags[2] = kind == 3 && symmetric.load();
  return {w, scale, mins, flags};
}

// GGUF Q4_0 / Q4_1 / Q8_0 blocks -> float32 (N, K), by gguf's own arithmetic so the result
// is bit for bit its dequantizer's: Q4_0 d * (q - 8), Q4_1 d * q + m, Q8_0 d * q, each a
// float32 product (and sum) rounded separately (no fused multiply-add).
__attribute__((optimize("fp-contract=off")))
at::Tensor gguf_dequantize(const at::Tensor& blocks, int64_t kind, int64_t N, int64_t K) {
  const at::Tensor src = checked_blocks(blocks, kind, N, K);
  const int64_t block_bytes = gguf_block_bytes(kind), nb = K / kBlock;
  const uint8_t* s = src.data_ptr<uint8_t>();
  at::Tensor out = at::empty({N, K}, src.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / K);
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = s + (r * nb + b) * block_bytes;
        float* y = o + r * K + b * kBlock;
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        const float d = static_cast<float>(c10::Half(dh, c10::Half::from_bits()));
        if (kind == 8) {
          const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
          for (int i = 0; i < 32; ++i) y[i] = d * static_cast<float>(q[i]);
        } else if (kind == 2) {
          const uint8_t* q = blk + 2;
          for (int i = 0; i < 16; ++i) {
            y[i] = d * static_cast<float>(static_cast<int>(q[i] & 0x0F) - 8);
            y[16 + i] = d * static_cast<float>(static_cast<int>(q[i] >> 4) - 8);
          }
        } else {
          uint16_t mh;
          std::memcpy(&mh, blk + 2, 2);
          const float m = static_cast<float>(c10::Half(mh, c10::Half::from_bits()));
          const uint8_t* q = blk + 4;
          for (int i = 0; i < 16; ++i) {
            y[i] = d * static_cast<float>(q[i] & 0x0F) + m;
            y[16 + i] = d * static_cast<float>(q[i] >> 4) + m;
          }
        }
      }
  });
  return out;
}

// A contiguous copy of `t` in weight memory (weight_empty), for tensors laid out in Python.
at::Tensor weight_copy(const at::Tensor& t) {
  at::Tensor out = mistral7b::weight_empty(t.sizes(), t.scalar_type());
  out.copy_(t);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mistral7b_qmm, m) {
  m.def("pack4(Tensor q) -> Tensor");
  m.def("pack8(Tensor q) -> Tensor");
  m.def("gguf_panels(Tensor blocks, int kind, int n, int k) -> Tensor[]");
  m.def("gguf_dequantize(Tensor blocks, int kind, int n, int k) -> Tensor");
  m.def("weight_copy(Tensor t) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistral7b_qmm, CPU, m) {
  m.impl("pack4", &pack4);
  m.impl("pack8", &pack8);
  m.impl("gguf_panels", &gguf_panels);
  m.impl("gguf_dequantize", &gguf_dequantize);
  m.impl("weight_copy", &weight_copy);
}
