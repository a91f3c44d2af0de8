// A short step of a whole layer stack in one call (DecodeStack): decode (one token per row)
// and speculative verification (a few): the Python loop over layers and its ~40 op
// dispatches per layer cost more than the matrix products of a small model (issue 16 item 2;
// fused_step.py is its Python side).
//
// Per layer, exactly as model.py's Block does it for T <= PAGED_MAX_T:
//
//   h = rmsnorm(x) * attention_norm
//   q, k, v = h Wq^T, h Wk^T, h Wv^T; rotate q and k (interleaved pairs, rope.py)
//   k, v -> the pool at slot write_slot[b] of row b (cache.py's layout (L, KV, S, Dh))
//   attention over the visible keys, read in the pool where they are (attention.cpp)
//   x = x + attn Wo^T
//   h = rmsnorm(x) * ffn_norm;  x = x + (silu(h W1^T) * h W3^T) W2^T
//
// Linears are our int4/int8 or K-quant panels (qmm.cpp, kquant.cpp) or float32 weights (at::linear, what F.linear
// runs). Activations are float32; the pool float32 or bfloat16 (a quantized model's default
// beyond ~1B parameters: model.py Transformer.compute_dtype). Every number is computed by the same kernel,
// on the same shapes, as the eager step (RMSNorm and attention through norm.cpp and
// attention.cpp as model.py does, SiLU through ATen; the rotation and the cache write by hand,
// exact),
// so the logits are equal to the bit: what a captured graph gives, without Python and the
// module calls between the ops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace {

struct Linear {
  mistral7b::QWeight q;  // q.bits == 0: a float32 weight, `dense`
  at::Tensor dense;

  at::Tensor operator()(const at::Tensor& x) const {
    return q.bits == 0 ? at::linear(x, dense) : mistral7b::qmm(x, q);
  }
};

// x times several linears: one parallel region when they are all quantized (qmm_many)
std::vector<at::Tensor> apply(const at::Tensor& x, std::initializer_list<const Linear*> ls) {
  std::vector<const mistral7b::QWeight*> qs;
  for (const Linear* l : ls)
    if (l->q.bits != 0) qs.push_back(&l->q);
  if (qs.size() == ls.size()) return mistral7b::qmm_many(x, qs);
  std::vector<at::Tensor> ys;
  for (const Linear* l : ls) ys.push_back((*l)(x));
  return ys;
}

struct Layer {
  at::Tensor attention_norm, ffn_norm;
  Linear wq, wk, wv, wo, w1, w2, w3;
};

// Rotate the interleaved pairs of each of `heads` head vectors of every row, rounding as
// rope.py's separate products and sum do: no fused multiply-add (this function is built for
// the baseline ISA, which has none, and each product is its own statement).
void rope(float* x, const float* cos, const float* sin, int64_t B, int64_t heads, int64_t Dh) {
  const int64_t half = Dh / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (b * heads + h) * Dh;
      const float* c = cos + b * half;
      const float* s = sin + b * half;
      for (int64_t i = 0; i < half; ++i) {
        const float x0 = v[2 * i], x1 = v[2 * i + 1];
        const float a = x0 * c[i], b = x1 * s[i], e = x0 * s[i], f = x1 * c[i];
        v[2 * i] = a - b;
        v[2 * i + 1] = e + f;
      }
    }
}

// Row b's k and v (B, KV * Dh) float32 -> slot slots[b] of each kv head of one layer's pool
// (KV, S, Dh), skipping rows whose slot is -1. A bfloat16 pool rounds to nearest even, as
// the eager step's tensor copy does.
template <typename E>
void write_slots(E* kl, E* vl, const at::Tensor& k, const at::Tensor& v, const int64_t* slots,
                 int64_t B, int64_t KV, int64_t S, int64_t Dh) {
  const float* kn = k.data_ptr<float>();
  const float* vn = v.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < KV && slots[b] >= 0; ++j) {
      E* kd = kl + (j * S + slots[b]) * Dh;
      E* vd = vl + (j * S + slots[b]) * Dh;
      const float* ks = kn + (b * KV + j) * Dh;
      const float* vs = vn + (b * KV + j) * Dh;
      if constexpr (std::is_same_v<E, float>) {
        std::memcpy(kd, ks, Dh * sizeof(float));
        std::memcpy(vd, vs, Dh * sizeof(float));
      } else {
        for (int64_t i = 0; i < Dh; ++i) {
          kd[i] = static_cast<E>(ks[i]);
          vd[i] = static_cast<E>(vs[i]);
        }
      }
    }
}

class DecodeStack : public torch::CustomClassHolder {
 public:
  DecodeStack(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps)
      : n_heads_(n_heads), n_kv_heads_(n_kv_heads), head_dim_(head_dim), eps_(eps) {
    TORCH_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0 && head_dim % 2 == 0,
                "DecodeStack: heads must group evenly and head_dim be even");
  }

  // One linear, in layer order wq wk wv wo w1 w2 w3: panels (bits 4 or 8) or a float32
  // weight (bits 0, `dense`).
  void add_linear(std::optional<at::Tensor> w, std::optional<at::Tensor> scale,
                  std::optional<at::Tensor> mins, int64_t bits, int64_t group, double offset,
                  int64_t n_out, std::optional<at::Tensor> dense) {
    Linear l;
    l.q.bits = bits;
    if (bits == 0) {
      TORCH_CHECK(dense.has_value() && dense->scalar_type() == at::kFloat && dense->dim() == 2,
                  "a float linear needs its float32 weight");
      l.dense = *dense;
    } else {
      TORCH_CHECK(w.has_value() && scale.has_value(), "a quantized linear needs w and scale");
      l.q.w = *w;
      l.q.scale = *scale;
      l.q.mins = mins;
      l.q.group = group;
      l.q.offset = offset;
      l.q.n_out = n_out;
    }
    pending_.push_back(std::move(l));
  }

  // One K-quant linear (kquant.cpp), in the same order as add_linear's.
  void add_klinear(at::Tensor w, at::Tensor scale, at::Tensor d, std::optional<at::Tensor> dmin,
                   int64_t bits, int64_t group, int64_t n_out) {
    Linear l;
    l.q.w = w;
    l.q.scale = scale;
    l.q.super_d = d;
    l.q.super_min = dmin;
    l.q.bits = bits;
    l.q.group = group;
    l.q.n_out = n_out;
    pending_.push_back(std::move(l));
  }

  // Close a layer: its two norm weights and the last seven linears added.
  void add_layer(at::Tensor attention_norm, at::Tensor ffn_norm) {
    TORCH_CHECK(pending_.size() == 7, "add_layer needs exactly 7 linears, got ",
                pending_.size());
    TORCH_CHECK(attention_norm.scalar_type() == at::kFloat &&
                    ffn_norm.scalar_type() == at::kFloat,
                "norm weights must be float32");
    Layer l{attention_norm.contiguous(), ffn_norm.contiguous(), pending_[0], pending_[1],
            pending_[2], pending_[3], pending_[4], pending_[5], pending_[6]};
    layers_.push_back(std::move(l));
    pending_.clear();
  }

  int64_t n_layers() const { return static_cast<int64_t>(layers_.size()); }

  // Each of the B rows is one query token (a step's rows times its tokens, AttentionPlan.
  // query_keys). x (B, D) float32: the embedded tokens; cos, sin (B, Dh/2); k_pool, v_pool
  // (L, KV, S, Dh) float32 or bfloat16; write_slot (B,) the slot each token goes to (-1: padding, not
  // written). Keys: the slots [view_start, view_stop) when gather is None, else gather
  // (B, K); mask (B, K) bool, or None (every key visible): attention.cpp's paged_attention.
  // All tokens are written before any attends, as model.py does.
  // Returns the hidden states after the last layer, (B, D).
  at::Tensor forward(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor k_pool,
                     at::Tensor v_pool, at::Tensor write_slot, std::optional<at::Tensor> gather,
                     int64_t view_start, int64_t view_stop, std::optional<at::Tensor> mask) {
    const int64_t B = x.size(0), D = x.size(1), H = n_heads_, KV = n_kv_heads_,
                  Dh = head_dim_;
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be (B, D) float32");
    const bool bf16_pool = k_pool.scalar_type() == at::kBFloat16;
    TORCH_CHECK(k_pool.dim() == 4 && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                    (bf16_pool || k_pool.scalar_type() == at::kFloat) &&
                    v_pool.scalar_type() == k_pool.scalar_type() &&
                    v_pool.sizes() == k_pool.sizes(),
                "the pools must be contiguous float32 or bfloat16 (L, KV, S, Dh)");
    TORCH_CHECK(k_pool.size(0) == n_layers() && k_pool.size(1) == KV && k_pool.size(3) == Dh,
                "pool shape does not match the stack");
    const int64_t S = k_pool.size(2);
    cos = cos.contiguous();
    sin = sin.contiguous();
    TORCH_CHECK(cos.numel() == B * Dh / 2 && sin.numel() == B * Dh / 2, "cos/sin: (B, Dh/2)");
    const auto slot = write_slot.to(at::kLong).contiguous();
    TORCH_CHECK(slot.numel() == B, "write_slot: one slot per row");
    const int64_t* sp = slot.data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) TORCH_CHECK(sp[i] >= -1 && sp[i] < S, "write slot range");

    for (int64_t li = 0; li < n_layers(); ++li) {
      const Layer& L = layers_[li];
      at::Tensor h = mistral7b::rms_norm(x, L.attention_norm, eps_);
      const auto qkv = apply(h, {&L.wq, &L.wk, &L.wv});
      at::Tensor q = qkv[0], k = qkv[1], v = qkv[2];
      rope(q.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), B, H, Dh);
      rope(k.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), B, KV, Dh);
      at::Tensor ck = k_pool.select(0, li), cv = v_pool.select(0, li);     // (KV, S, Dh)
      if (bf16_pool) {
        write_slots(ck.data_ptr<at::BFloat16>(), cv.data_ptr<at::BFloat16>(), k, v, sp, B, KV, S, Dh);
      } else {
        write_slots(ck.data_ptr<float>(), cv.data_ptr<float>(), k, v, sp, B, KV, S, Dh);
      }
      at::Tensor out = mistral7b::paged_attention(q.view({B, H, Dh}), ck, cv, gather,
                                                  view_start, view_stop, mask);
      x = x + L.wo(out.reshape({B, H * Dh}));
      h = mistral7b::rms_norm(x, L.ffn_norm, eps_);
      const auto gate_up = apply(h, {&L.w1, &L.w3});
      x = x + L.w2(at::silu(gate_up[0]) * gate_up[1]);
    }
    return x;
  }

 private:
  int64_t n_heads_, n_kv_heads_, head_dim_;
  double eps_;
  std::vector<Layer> layers_;
  std::vector<Linear> pending_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(mistral7b_qmm, m) {
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<int64_t, int64_t, int64_t, double>())
      .def("add_linear", &DecodeStack::add_linear)
      .def("add_klinear", &DecodeStack::add_klinear)
      .def("add_layer", &DecodeStack::add_layer)
      .def("n_layers", &DecodeStack::n_layers)
      .def("forward", &DecodeStack::forward);
}
