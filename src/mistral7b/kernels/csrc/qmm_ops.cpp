// The ops of qmm.cpp's kernels (compiled once, in the library's AVX-512 build: M7_PRIMARY):
// their checks, the choice of instruction set (mistral7b::isa), qmm_many's sharing of several
// products, and the registration of the library's schemas with PyTorch.

#include "kernels.h"  // (first: it sets M7_PRIMARY)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlock = mistral7b::kBlockInputs;
constexpr int64_t kRows = mistral7b::kPanelRows;
using mistral7b::Isa;

std::string isa_name() {
  switch (mistral7b::isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "";
  }
}

void check_weight(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                  const std::optional<at::Tensor>& mins, int64_t bits, int64_t group,
                  int64_t n_out) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a contiguous 2-D float32 or bfloat16 tensor");
  const int64_t K = x.size(1), N = n_out;
  TORCH_CHECK(K % kBlock == 0 && N % kRows == 0, "K must be a multiple of 32 and N of 16");
  TORCH_CHECK(group % kBlock == 0 && K % group == 0, "group must be a multiple of 32 dividing K");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() &&
                  w.numel() == N * K * bits / 8,
              "w must hold ", N * K * bits / 8, " contiguous bytes");
  TORCH_CHECK(scale.is_contiguous() && scale.numel() == N * (K / group), "scale size");
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf,
              "scale must be float16 or float32");
  if (mins.has_value())
    TORCH_CHECK(mins->scalar_type() == scale.scalar_type() && mins->is_contiguous() &&
                    mins->numel() == scale.numel(),
                "mins must match scale");
}

// x (M, K) float32 or bfloat16; w the panels (uint8, N/16 * K/32 * 256 or 512 bytes); scale
// and mins (N/16, K/G, 16) float16 or float32 (mins: None for the symmetric form). Returns
// (M, N) in x's dtype (sums are float32 throughout; a bfloat16 output is rounded once).
at::Tensor qmm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
               const std::optional<at::Tensor>& mins, int64_t bits, int64_t group,
               double offset, int64_t n_out) {
  mistral7b::check_isa("qmm");
  check_weight(x, w, scale, mins, bits, group, n_out);
  at::Tensor y = at::empty({x.size(0), n_out}, x.options());
  if (x.size(0) == 0) return y;
  M7_ON_ISA(qmm_into(x, w, scale, mins, bits, group, offset, y));
  return y;
}

// qmm for several weights of one float32 x (wq, wk, wv; w1, w3): the activations quantized
// once per group size, every weight's panels shared out in one parallel region. Each output
// equals its own qmm call to the bit.
std::vector<at::Tensor> qmm_many(const at::Tensor& x,
                                 const std::vector<const mistral7b::QWeight*>& ws) {
  mistral7b::check_isa("qmm");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "qmm_many takes float32 x");
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<at::Tensor> ys;
  std::vector<mistral7b::Product> products;
  std::vector<int64_t> first_panel{0};
  // by (group, span): a K-quant's activations take a scale per super-block and sums per 32
  std::vector<std::pair<std::pair<int64_t, int64_t>, std::unique_ptr<mistral7b::ActBlocks>>> acts;
  for (const auto* q : ws) {
    const bool kquant = q->super_d.has_value();
    const std::pair<int64_t, int64_t> act_form{kquant ? kBlock : q->group,
                                               kquant ? mistral7b::kSuperInputs : kBlock};
    if (kquant) mistral7b::check_kweight(*q, K);
    else check_weight(x, q->w, q->scale, q->mins, q->bits, q->group, q->n_out);
    ys.push_back(at::empty({M, q->n_out}, x.options()));
    const mistral7b::ActBlocks* a = nullptr;
    for (const auto& [form, qa] : acts)
      if (form == act_form) a = qa.get();
    if (a == nullptr) {
      acts.emplace_back(act_form, std::make_unique<mistral7b::ActBlocks>());
      mistral7b::quantize_acts(x, act_form.first, *acts.back().second, act_form.second);
      a = acts.back().second.get();
    }
    const bool half = q->scale.scalar_type() == at::kHalf, affine = q->mins.has_value();
    const auto span = kquant ? M7_ON_ISA(kquant_span(q->bits))
                             : M7_ON_ISA(qmm_span(half, q->bits, affine));
    products.push_back(mistral7b::Product{q->w.data_ptr<uint8_t>(), q->scale.data_ptr(),
                                          affine ? q->mins->data_ptr() : nullptr,
                                          kquant ? q->super_d->data_ptr() : nullptr,
                                          q->super_min ? q->super_min->data_ptr() : nullptr,
                                          static_cast<float>(q->offset), q->n_out, q->group,
                                          ys.back().data_ptr<float>(), a, span});
    first_panel.push_back(first_panel.back() + q->n_out / kRows);
  }
  if (M == 0) return ys;
  at::parallel_for(0, first_panel.back(), 1, [&](int64_t p0, int64_t p1) {
    for (size_t i = 0; i < products.size(); ++i) {
      const int64_t lo = std::max(p0, first_panel[i]), hi = std::min(p1, first_panel[i + 1]);
      if (lo < hi) products[i].span(products[i], M, K, lo - first_panel[i], hi - first_panel[i]);
    }
  });
  return ys;
}

}  // namespace

namespace mistral7b {

Isa isa() {
  static const Isa chosen = [] {
#if defined(__x86_64__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512dq");
    const char* want = std::getenv("MISTRAL7B_ISA");
    if (want != nullptr && std::string(want) == "avx2") return avx2 ? Isa::kAvx2 : Isa::kNone;
    return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kNone;
#else
    return Isa::kNone;
#endif
  }();
  return chosen;
}

void check_isa(const char* op) {
  TORCH_CHECK(isa() != Isa::kNone, op, " needs an x86 CPU with AVX2, FMA and F16C");
}

at::Tensor qmm(const at::Tensor& x, const QWeight& q) {
  if (q.super_d.has_value()) return kqmm(x, q);
  return ::qmm(x, q.w, q.scale, q.mins, q.bits, q.group, q.offset, q.n_out);
}

void quantize_acts(const at::Tensor& x, int64_t G, ActBlocks& acts, int64_t span) {
  check_isa("quantize_acts");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D tensor");
  TORCH_CHECK(x.size(1) % G == 0 && G % kBlock == 0, "G must be a multiple of 32 dividing K");
  TORCH_CHECK(x.size(1) % span == 0 && span % kBlock == 0,
              "the scale span must be a multiple of 32 dividing K");
  M7_ON_ISA(quantize_acts(x, G, acts, span));
}

std::vector<at::Tensor> qmm_many(const at::Tensor& x, const std::vector<const QWeight*>& ws) {
  return ::qmm_many(x, ws);
}
}  // namespace mistral7b

// Schemas here (the library's other files add theirs as fragments), kernels under the CPU
// dispatch key: that lets torch.compile trace the ops
// through their fake (shape-only) implementations, registered in native.py.
TORCH_LIBRARY(mistral7b_qmm, m) {
  m.def("isa() -> str", &isa_name);
  m.def("qmm(Tensor x, Tensor w, Tensor scale, Tensor? mins, int bits, int group, float offset, "
        "int n_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistral7b_qmm, CPU, m) {
  m.impl("qmm", &qmm);
}
