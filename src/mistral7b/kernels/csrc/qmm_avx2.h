// AVX2 pre-fill of 4-bit panels with a scale per block (Q4_0, int4 g32): qmm.cpp's
// `block_panel` for a full tile of 4 rows, on values unpacked once per group of panels, its
// block step written in assembly. Included by qmm.cpp's AVX2 build only.
//
// Why by hand. On AVX2 this loop is bound by how many vector instructions it issues (~3 a
// cycle here, whatever their kind), so each one a block and row costs ~4%. Compiled from
// qmm.cpp's template, GCC keeps the 4 float accumulators on the stack (the block's 8 value
// registers, d and the constants leave too few of the 16), adds the two int16 halves with
// two `vpmaddwd`, and unpacks the nibbles again in every tile. Here, per block and row: 8
// `vpmaddubsw` summed in int16 (|sum| <= 8 x 2 x 15 x 127 < 2^15), one `vpmaddwd`, the
// offset taken off as 8 x the block's sum (ActBlocks::s32), the conversion and the two float
// operations of qmm.cpp's order; the 8 value registers are loaded, unpacked by the group's
// first tile for all the others. The integers are exact either way and the float operations
// are qmm.cpp's, so the outputs are the same bits as `block_panel`'s. Single thread, 8
// panels x 4096 inputs in L2, 4 rows: 158 -> 175 GOP/s (a scratch harness of this step
// against `block_panel`); 7B Q4_0 projections at 256 rows, 2 threads: ~300 -> ~310
// (bench/bench_kernels.py --model ... --rows 256).
#pragma once

namespace M7_NS {

// whether qmm.cpp's panels of BITS (AFFINE: with mins) take this file's path, and from how
// many activation rows: the first tile's stores of the values are paid back by the others
// from ~32 rows (7B Q4_0 projections, 2 threads, against block_panel: 8 rows -10%, 16 and 32
// even, 64 +3%, 256 +5-8%)
template <int BITS, bool AFFINE>
constexpr bool kTile4 = M7_ISA == 2 && BITS == 4 && !AFFINE;
constexpr int64_t kTile4MinRows = 32;

#if M7_ISA == 2

alignas(32) inline constexpr int16_t kOnes16[16] = {1, 1, 1, 1, 1, 1, 1, 1,
                                                     1, 1, 1, 1, 1, 1, 1, 1};

// One activation row t of the tile against the 8 value registers ymm0..7: the int16 sum in
// ymm13 (products in ymm14 / ymm15), then its int32 pairs less 8 x the block sum, converted,
// times d (%[d]) x a_t, added to the row's accumulator.
#define M7_BCAST(t, off, reg) "vpbroadcastd " #t "*32+" #off "(%[q]), %%" reg "\n\t"
#define M7_MADD(wreg, reg) "vpmaddubsw %%" reg ", %%" wreg ", %%" reg "\n\t"
#define M7_ADDW(reg) "vpaddw %%" reg ", %%ymm13, %%ymm13\n\t"
#define M7_ROW(t, acc)                                                                        \
  M7_BCAST(t, 0, "ymm13") M7_MADD("ymm0", "ymm13")                                            \
  M7_BCAST(t, 16, "ymm14") M7_MADD("ymm1", "ymm14") M7_ADDW("ymm14")                          \
  M7_BCAST(t, 4, "ymm15") M7_MADD("ymm2", "ymm15") M7_ADDW("ymm15")                           \
  M7_BCAST(t, 20, "ymm14") M7_MADD("ymm3", "ymm14") M7_ADDW("ymm14")                          \
  M7_BCAST(t, 8, "ymm15") M7_MADD("ymm4", "ymm15") M7_ADDW("ymm15")                           \
  M7_BCAST(t, 24, "ymm14") M7_MADD("ymm5", "ymm14") M7_ADDW("ymm14")                          \
  M7_BCAST(t, 12, "ymm15") M7_MADD("ymm6", "ymm15") M7_ADDW("ymm15")                          \
  M7_BCAST(t, 28, "ymm14") M7_MADD("ymm7", "ymm14") M7_ADDW("ymm14")                          \
  "vpmaddwd %[ones], %%ymm13, %%ymm13\n\t"                                                    \
  "vpbroadcastd " #t "*4(%[s]), %%ymm14\n\t"                                                  \
  "vpsubd %%ymm14, %%ymm13, %%ymm13\n\t"                                                      \
  "vcvtdq2ps %%ymm13, %%ymm13\n\t"                                                            \
  "vbroadcastss " #t "*4(%[a]), %%ymm14\n\t"                                                  \
  "vmulps %[d], %%ymm14, %%ymm14\n\t"                                                         \
  "vfmadd231ps %%ymm14, %%ymm13, %[" acc "]\n\t"
#define M7_ROWS M7_ROW(0, "acc0") M7_ROW(1, "acc1") M7_ROW(2, "acc2") M7_ROW(3, "acc3")
#define M7_LOAD_VALUES(i) "vmovdqu " #i "*32(%[w]), %%ymm" #i "\n\t"
// chunk j of the packed block (its part: %[packed]) into registers 2j (low nibbles) and
// 2j + 1 (high), each stored where M7_LOAD_VALUES reads it
#define M7_UNPACK_CHUNK(j, lo, hi)                                                            \
  "vmovdqu " #j "*64(%[packed]), %%ymm" #lo "\n\t"                                            \
  "vpsrlw $4, %%ymm" #lo ", %%ymm" #hi "\n\t"                                                 \
  "vpand %[mask], %%ymm" #lo ", %%ymm" #lo "\n\t"                                             \
  "vpand %[mask], %%ymm" #hi ", %%ymm" #hi "\n\t"                                             \
  "vmovdqu %%ymm" #lo ", " #lo "*32(%[w])\n\t"                                                \
  "vmovdqu %%ymm" #hi ", " #hi "*32(%[w])\n\t"
#define M7_CLOBBERS \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm13", "xmm14", "xmm15"

alignas(32) inline constexpr uint8_t kLow4[32] = {
    15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
    15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15};

// The 16 rows of one panel (scale per block of 32: S float16 or float32) times the tile of 4
// rows (ActBlocks: q, a, s32 at the tile's); `values` the panel's unpacked values: for the
// part of 8 rows `part`, block b's 8 registers of values 0..15 (unpack_nibbles' order) at
// values + 256 (part nb + b) + 32 i, so that a pass over one part reads whole lines in turn
// (in the panel's order, where the parts share each line, each is read twice from L2). With
// `packed` (the panel's bytes, for the group's first tile) they are unpacked here from it and
// stored into `values` as they are used, so the weights' trip from memory overlaps the
// products (a pass of its own cost ~20% at 8 rows).
template <typename S, typename Y>
M7_TARGET void block_panel_tile4(const uint8_t* packed, uint8_t* values, const S* scale,
                                 const int8_t* q, const float* a, const int32_t* s32, int64_t K,
                                 Y* y, int64_t N) {
  const int64_t n_blocks = K / mistral7b::kBlockInputs;
  for (int64_t part = 0; part < kParts; ++part) {
    VF acc0 = f_zero(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const VF d = f_load(scale + b * mistral7b::kPanelRows + part * kLanes);
      uint8_t* w = values + 256 * (part * n_blocks + b);
      if (packed != nullptr) {
        if (part == 0) prefetch_lines(packed + (b + kPrefetchBlocks) * 256, 4);
        __asm__(
            M7_UNPACK_CHUNK(0, 0, 1) M7_UNPACK_CHUNK(1, 2, 3) M7_UNPACK_CHUNK(2, 4, 5)
            M7_UNPACK_CHUNK(3, 6, 7) M7_ROWS
            : [acc0] "+x"(acc0), [acc1] "+x"(acc1), [acc2] "+x"(acc2), [acc3] "+x"(acc3),
              "=m"(*reinterpret_cast<uint8_t(*)[256]>(w))   // (what it stores)
            : [d] "x"(d), [w] "r"(w), [packed] "r"(packed + 256 * b + 32 * part),
              [q] "r"(q + 128 * b), [a] "r"(a + 4 * b), [s] "r"(s32 + 4 * b),
              [ones] "m"(*reinterpret_cast<const __m256i*>(kOnes16)),
              [mask] "m"(*reinterpret_cast<const __m256i*>(kLow4))
            : M7_CLOBBERS);
        continue;
      }
      __asm__(M7_LOAD_VALUES(0) M7_LOAD_VALUES(1) M7_LOAD_VALUES(2) M7_LOAD_VALUES(3)
              M7_LOAD_VALUES(4) M7_LOAD_VALUES(5) M7_LOAD_VALUES(6) M7_LOAD_VALUES(7) M7_ROWS
              : [acc0] "+x"(acc0), [acc1] "+x"(acc1), [acc2] "+x"(acc2), [acc3] "+x"(acc3)
              : [d] "x"(d), [w] "r"(w), [q] "r"(q + 128 * b), [a] "r"(a + 4 * b),
                [s] "r"(s32 + 4 * b), [ones] "m"(*reinterpret_cast<const __m256i*>(kOnes16)),
                "m"(*reinterpret_cast<const uint8_t(*)[256]>(w))   // (what it reads)
              : M7_CLOBBERS);
    }
    const VF accs[4] = {acc0, acc1, acc2, acc3};
    for (int t = 0; t < 4; ++t) f_store(y + t * N + part * kLanes, accs[t]);
  }
}

#undef M7_BCAST
#undef M7_MADD
#undef M7_ADDW
#undef M7_ROW
#undef M7_ROWS
#undef M7_LOAD_VALUES
#undef M7_UNPACK_CHUNK
#undef M7_CLOBBERS

#else  // declared only: qmm.cpp calls them where kTile4 holds

template <typename S, typename Y>
void block_panel_tile4(const uint8_t* packed, uint8_t* values, const S* scale, const int8_t* q,
                       const float* a, const int32_t* s32, int64_t K, Y* y, int64_t N);

#endif  // M7_ISA == 2

}  // namespace M7_NS
