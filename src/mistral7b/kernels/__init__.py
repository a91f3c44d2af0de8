"""Our CPU kernels: native.py builds the C++ library (csrc/) on first use and loads it.

- qmm.cpp: int4/int8 weight products on AVX-512 VNNI or AVX2 (qmm_avx2.h: AVX2 pre-fill's
  block step), their ops in qmm_ops.cpp; kquant.cpp: GGUF K-quants; bf16.cpp: bf16 decode;
- pack.cpp: weights into the products' panel layout, GGUF blocks straight in;
- attention.cpp: decode attention read from the paged KV pool where the keys are;
- norm.cpp: RMSNorm with a fixed order of operations;
- step.cpp: the fused decode step of a whole layer stack (driven by mistral7b.fused_step).

This package imports nothing else of mistral7b: the model, the cache and quant import it.
"""
