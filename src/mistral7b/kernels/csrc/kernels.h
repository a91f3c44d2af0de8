// What the files of this library call of each other (each op is also registered with
// PyTorch under mistral7b_qmm:: for Python).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace mistral7b {

// The panel layout (qmm.cpp's header): output rows per panel, inputs per block.
constexpr int64_t kPanelRows = 16;
constexpr int64_t kBlockInputs = 32;

// One weight in our panels (qmm.cpp's header comment): w = d * q + m per group of inputs.
struct QWeight {
  at::Tensor w, scale;
  std::optional<at::Tensor> mins;
  int64_t bits = 0, group = 0, n_out = 0;
  double offset = 0.0;
};

// qmm.cpp: y = x @ W^T; qmm_many: several weights of one x in one parallel region
at::Tensor qmm(const at::Tensor& x, const QWeight& q);
std::vector<at::Tensor> qmm_many(const at::Tensor& x, const std::vector<const QWeight*>& ws);

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
