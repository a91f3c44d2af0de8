"""Our CPU kernels (csrc/): int4/int8 weights (qmm.cpp, its AVX2 pre-fill step qmm_avx2.h, its
ops qmm_ops.cpp, with pack.cpp laying weights out for it), GGUF K-quants on their own bits
(kquant.cpp, laid out by kpack.cpp), bf16 weights at decode (bf16.cpp), decode attention over
the paged KV pool (attention.cpp), RMSNorm (norm.cpp) and the fused decode step (step.cpp),
compiled on first use into one cached library; kernels.h holds what several of them share.

    ops = native.ops()          # None where it cannot run: then layers.py uses PyTorch's kernels
    y = ops.qmm(x, w, scale, mins, bits, group, offset, n_out)

The extension is built with the C++ compiler PyTorch's own extensions use (`CXX`, else `c++`)
against the installed torch, into `$XDG_CACHE_HOME/mistral7b/` (default `~/.cache`), named by a
hash of the source, the torch version and the compiler, so an upgrade rebuilds it. A build takes
about a minute once per machine; it happens at the first quantized load. It is used on an x86
CPU with AVX-512 VNNI or, with the same kernels compiled for it, AVX2 (csrc/simd.h; chosen at
run time, `MISTRAL7B_ISA=avx2` picks AVX2 on an AVX-512 CPU, `ops().isa()` says which);
`MISTRAL7B_NATIVE=0` turns it off.

Threads: the extension calls `at::parallel_for`, whose OpenMP runtime is the `libgomp.so.1`
torch already loaded (the same soname), so both share one pool and never fight for cores.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("qmm.cpp", "qmm_ops.cpp", "pack.cpp", "kquant.cpp", "kpack.cpp",
                             "bf16.cpp", "attention.cpp", "norm.cpp", "step.cpp"))
# the kernels' sources, compiled a second time for AVX2 (csrc/simd.h); the first build of
# every source is AVX-512's and holds the ops
TWICE = frozenset({"qmm.cpp", "kquant.cpp", "attention.cpp", "norm.cpp"})


def _builds() -> list[tuple[Path, str]]:
    """(source, M7_ISA) for every object of the library."""
    return [(src, isa) for src in SOURCES
            for isa in (("512", "2") if src.name in TWICE else ("512",))]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mistral7b" / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _compile_command(cxx: str, src: Path, isa: str, obj: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [cxx, "-O3", "-std=c++17", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-DM7_ISA={isa}", *[f"-I{p}" for p in include_paths()], "-c", str(src),
            "-o", str(obj)]


def _link_command(cxx: str, objs: list[Path], out: Path) -> list[str]:
    torch_lib = Path(torch.__file__).parent / "lib"
    return [cxx, "-shared", "-fopenmp", *map(str, objs), "-o", str(out), f"-L{torch_lib}",
            "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]


def library_path(cxx: str) -> Path:
    digest = hashlib.sha256()
    for src in sorted(SOURCES[0].parent.iterdir()):   # the sources and their header
        digest.update(src.read_bytes())
    digest.update(f"{torch.__version__}|{cxx}|{sys.platform}".encode())
    return cache_dir() / f"qmm-{digest.hexdigest()[:16]}.so"


def build(verbose: bool = False) -> Path:
    """Compile the extension if it is not cached yet; returns the library's path."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    target = library_path(cxx)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        builds = _builds()
        objs = [Path(tmp) / f"{src.stem}.{isa}.o" for src, isa in builds]
        # the sources compile side by side (one process each), then link
        steps = [_compile_command(cxx, src, isa, obj) for (src, isa), obj in zip(builds, objs)]
        log.info("building the CPU kernels (once): %s", " ".join(steps[0]))
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for cmd in steps]
        errs = [proc.communicate()[1] for proc in procs]
        results = [(src, proc.returncode, err)
                   for (src, _), proc, err in zip(builds, procs, errs)]
        link = subprocess.run(_link_command(cxx, objs, out), check=False, capture_output=True,
                              text=True) if all(rc == 0 for _, rc, _ in results) else None
        for src, rc, err in results:
            if rc != 0:
                raise RuntimeError(f"compiling {src.name} failed:\n{err[-4000:]}")
        assert link is not None
        if link.returncode != 0:
            raise RuntimeError(f"linking the CPU kernels failed:\n{link.stderr[-4000:]}")
        if verbose:
            print("".join(err for _, _, err in results), file=sys.stderr)
        os.replace(out, target)  # atomic: a concurrent build of the same file is harmless
    return target


@functools.cache
def ops():
    """`torch.ops.mistral7b_qmm` where the kernel can run here, else None (with a log line
    saying why)."""
    if os.environ.get("MISTRAL7B_NATIVE", "1") == "0":
        return None
    if not _is_x86():
        return None
    try:
        torch.ops.load_library(str(build()))
    except (RuntimeError, OSError) as exc:
        log.warning("the int4/int8 CPU kernel is unavailable, using PyTorch's slower ones: %s",
                    exc)
        return None
    namespace = torch.ops.mistral7b_qmm
    if not namespace.isa():   # neither AVX-512 VNNI nor AVX2 here
        log.warning("the CPU kernels need AVX2 or AVX-512 VNNI, which this CPU lacks: "
                    "using PyTorch's slower ones")
        return None
    _register_fakes()
    return namespace


def _register_fakes() -> None:
    """Shape-only versions of the ops, so torch.compile / meta tensors can trace them."""

    @torch.library.register_fake("mistral7b_qmm::qmm")
    def _qmm(x, w, scale, mins, bits, group, offset, n_out):
        return x.new_empty(x.shape[0], n_out)

    @torch.library.register_fake("mistral7b_qmm::kqmm")
    def _kqmm(x, w, scale, d, dmin, bits, group, n_out):
        return x.new_empty(x.shape[0], n_out)

    @torch.library.register_fake("mistral7b_qmm::bf16_gemv")
    def _gemv(x, w):
        return x.new_empty(x.shape[0], w.shape[0])


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


# ---------------------------------------------------------------------------- the layout


@dataclass
class Panels:
    """One weight (n_out, n_in) in the kernel's layout (csrc/qmm.cpp's header): w = d * q + m
    per group of `group` inputs, with m = mins or, when mins is None, -offset * d."""

    w: torch.Tensor              # uint8, the panels, flat
    scale: torch.Tensor          # (n_out / 16, n_in / group, 16) float16 or float32
    mins: torch.Tensor | None    # same, or None
    bits: int
    group: int
    offset: float
    n_out: int
    n_in: int

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(M, n_in) float32 or bfloat16, contiguous -> (M, n_out) of the same dtype."""
        return ops().qmm(x, self.w, self.scale, self.mins, self.bits, self.group, self.offset,
                         self.n_out)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.w, self.scale, self.mins) if t is not None)

    def values(self) -> torch.Tensor:
        """(n_out, n_in) the unsigned stored values (0..15, or q + 128 for 8 bits)."""
        n, k = self.n_out, self.n_in
        if self.bits == 8:
            v = self.w.view(n // 16, k // 32, 8, 16, 4)                    # (p, b, j, r, t)
            return v.permute(0, 3, 1, 2, 4).reshape(n, k)
        v = self.w.view(n // 16, k // 32, 4, 16, 4)
        halves = torch.stack([v & 0x0F, v >> 4], dim=2)                     # (p, b, h, j, r, t)
        return halves.permute(0, 4, 1, 2, 3, 5).reshape(n, k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k, g = self.n_out, self.n_in, self.group
        d = unpanel(self.scale).float()[..., None]                         # (n, k / g, 1)
        q = self.values().float().view(n, k // g, g)
        m = unpanel(self.mins).float()[..., None] if self.mins is not None else -self.offset * d
        return (q * d + m).view(n, k).to(dtype)


def panel(s: torch.Tensor) -> torch.Tensor:
    """Per-row group values (n_out, groups) -> (n_out / 16, groups, 16), in weight memory
    (csrc/pack.cpp weight_empty: huge pages with MISTRAL7B_HUGE_PAGES=1)."""
    n, groups = s.shape
    return ops().weight_copy(s.reshape(n // 16, 16, groups).transpose(1, 2))


def unpanel(s: torch.Tensor) -> torch.Tensor:
    return s.transpose(1, 2).reshape(-1, s.shape[1])


def fits(n_out: int, n_in: int, group: int) -> bool:
    """Shapes the kernel takes (every Mistral and SmolLM2 linear does)."""
    return n_out % 16 == 0 and n_in % 32 == 0 and group % 32 == 0 and n_in % group == 0


def _exact_half(*ts: torch.Tensor) -> bool:
    return all(torch.equal(t.half().float(), t.float()) for t in ts)


def pack_int4(q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, group: int, *,
              exact: bool = False) -> Panels:
    """Portable int4 (layers.Int4Weight's q / scale / min) -> panels; a min of exactly
    -8 * scale (Q4_0) is not stored at all.

    Scales and mins are stored in float16: exactly for GGUF Q4_0/Q4_1 and our quantizer.
    Q4_K's products d * sc (11 x 6 significant bits) are rounded to float16 unless `exact`
    (then float32, 2 more bits per weight: 5.7 instead of 4.4 GB for 7B): the rounding moves
    a weight by at most 15 * 2^-12 of its group's step, under 0.4% of the quantization error
    already there."""
    n, k = q.shape[0], q.shape[1] * 2
    symmetric = torch.equal(mins, scale * -8.0)
    in_range = bool(scale.abs().max() < 65000 and mins.abs().max() < 65000)
    dtype = torch.float16 if in_range and (not exact or _exact_half(scale, mins)) \
        else torch.float32
    return Panels(ops().pack4(q), panel(scale.to(dtype)),
                  None if symmetric else panel(mins.to(dtype)), 4, group, 8.0, n, k)


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> Panels:
    """int8 (layers.Int8Weight: a scale per row, or per group of a row) -> panels, the
    scales in float16 where exact (GGUF Q8_0), else float32."""
    n, k = q.shape
    scale = scale.float().reshape(n, -1)
    dtype = torch.float16 if scale.shape[1] > 1 and _exact_half(scale) else torch.float32
    return Panels(ops().pack8(q), panel(scale.to(dtype)), None, 8, k // scale.shape[1], 128.0,
                  n, k)


# GGUF block types the kernel takes as they are (csrc/pack.cpp gguf_panels): name -> type id.
GGUF_PANEL_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}


def gguf_panels(qtype_name: str, data: torch.Tensor, n_out: int, n_in: int) -> Panels | None:
    """A GGUF Q4_0 / Q4_1 / Q8_0 tensor (its block bytes, uint8) straight into panels, equal
    bit for bit to importing it (gguf_import.py) and packing it (pack_int4 / pack_int8); None
    unless every scale (and min) is finite and below 65000, the values the kernel's float16
    scales take safely: a Panels result vouches that the blocks' scales are sound."""
    namespace = ops()
    if namespace is None or qtype_name not in GGUF_PANEL_TYPES or not fits(n_out, n_in, 32):
        return None
    w, scale, mins, flags = namespace.gguf_panels(data, GGUF_PANEL_TYPES[qtype_name], n_out,
                                                  n_in)
    scales_ok, mins_ok, symmetric = flags.tolist()
    if not scales_ok or (qtype_name == "Q4_1" and not mins_ok):
        return None
    if qtype_name == "Q8_0":  # one group per row is per-channel int8: float32, as pack_int8
        return Panels(w, scale if n_in > 32 else scale.float(), None, 8, 32, 128.0, n_out, n_in)
    if qtype_name == "Q4_1" and not symmetric:
        return Panels(w, scale, mins, 4, 32, 8.0, n_out, n_in)
    return Panels(w, scale, None, 4, 32, 8.0, n_out, n_in)


# GGUF K-quant types the kernel runs on their own bits (csrc/kquant.cpp): name -> (ggml type
# id, bits per value, values per sub-block scale).
GGUF_KQUANT_TYPES = {"Q4_K": (12, 4, 32), "Q5_K": (13, 5, 32), "Q6_K": (14, 6, 16)}


def gguf_dequantize(qtype_name: str, data: torch.Tensor, n_out: int, n_in: int
                    ) -> torch.Tensor | None:
    """GGUF Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K blocks -> float32 (n_out, n_in) in one C++
    pass, bit for bit gguf's dequantizer; None where the kernel library does not run or the
    type is another (numpy does it then)."""
    namespace = ops()
    if namespace is None:
        return None
    if qtype_name in GGUF_KQUANT_TYPES and n_in % 256 == 0:
        return namespace.gguf_kdequantize(data, GGUF_KQUANT_TYPES[qtype_name][0], n_out, n_in)
    if qtype_name not in GGUF_PANEL_TYPES or n_in % 32:
        return None
    return namespace.gguf_dequantize(data, GGUF_PANEL_TYPES[qtype_name], n_out, n_in)


@dataclass
class KPanels:
    """One K-quant weight (n_out, n_in) in the kernel's layout (csrc/kquant.cpp's header):
    w = d * sc * q - dmin * m per sub-block (Q4_K, Q5_K), d * sc * (q - 32) (Q6_K)."""

    w: torch.Tensor               # uint8, the panels, flat
    scale: torch.Tensor           # (n_out / 16, n_in / 256 * 12, 16) uint8: each super-block's
    #                               packed 6-bit (sc, m) pairs; Q6_K (.., n_in / 16, 16) int8
    d: torch.Tensor               # (n_out / 16, n_in / 256, 16) float16
    dmin: torch.Tensor | None     # like d; None for Q6_K
    bits: int
    group: int                    # values per sub-block
    n_out: int
    n_in: int

    @property
    def kind(self) -> str:
        return {4: "Q4_K", 5: "Q5_K", 6: "Q6_K"}[self.bits]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(M, n_in) float32, contiguous -> (M, n_out) float32."""
        return ops().kqmm(x, self.w, self.scale, self.d, self.dmin, self.bits, self.group,
                          self.n_out)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.w, self.scale, self.d, self.dmin) if t is not None)

    def sub_factors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per row and sub-block (n_out, sub-blocks), in gguf's float32 arithmetic: d * sc,
        and dmin * m (None for Q6_K)."""
        per_super = 256 // self.group
        raw = unpanel(self.scale)

        def times(factor: torch.Tensor, ints: torch.Tensor) -> torch.Tensor:
            return unpanel(factor).float().repeat_interleave(per_super, dim=1) * ints.float()

        if self.dmin is None:
            return times(self.d, raw), None
        sc, m = k4_scale_min(raw.view(self.n_out, -1, 12).numpy())
        return (times(self.d, torch.from_numpy(sc).reshape(self.n_out, -1)),
                times(self.dmin, torch.from_numpy(m).reshape(self.n_out, -1)))

    def values(self) -> torch.Tensor:
        """(n_out, n_in) the stored values, 0 .. 2^bits - 1."""
        n, k, bits = self.n_out, self.n_in, self.bits
        v = self.w.view(n // 16, k // 32, bits, 16, 4)                      # (p, b, c, r, t)
        low = torch.stack([v[:, :, :4] & 0x0F, v[:, :, :4] >> 4], dim=2)     # (p, b, h, j, r, t)
        if bits > 4:
            # value 16h + 4j + t of a block is 4k + t with k = 4h + j: its top bits are bits
            # k * width .. of the high chunks' byte t (the header)
            width = bits - 4
            high = torch.stack([torch.stack([
                (v[:, :, 4 + (4 * h + j) * width // 8] >> ((4 * h + j) * width % 8))
                & ((1 << width) - 1) for j in range(4)], dim=2) for h in range(2)], dim=2)
            low = low | (high << 4)
        return low.permute(0, 4, 1, 2, 3, 5).reshape(n, k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight, by gguf's own float32 arithmetic (its dequantizer, bit for bit):
        d * sc and dmin * m first, then d_sc * q - dmin_m (Q6_K: d_sc * (q - 32))."""
        n, k, g = self.n_out, self.n_in, self.group
        d_sc, dm = self.sub_factors()
        q = self.values().float().view(n, k // g, g)
        w = d_sc[..., None] * (q - 32) if dm is None else d_sc[..., None] * q - dm[..., None]
        return w.view(n, k).to(dtype)


def k4_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's 12-byte packing of eight 6-bit scales and eight 6-bit mins (Q4_K, Q5_K;
    get_scale_min_k4), uint8 (..., 12) -> sc, m (..., 8): bytes 0-3 hold sc[0..3] in their
    low 6 bits, bytes 4-7 m[0..3]; sc[4..7] and m[4..7] take their low 4 bits from bytes 8-11
    (low / high nibble) and their top 2 bits from the top bits of bytes 0-3 / 4-7."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    m = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, m


def gguf_kpanels(qtype_name: str, data: torch.Tensor, n_out: int, n_in: int
                 ) -> KPanels | None:
    """A GGUF Q4_K / Q5_K / Q6_K tensor (its block bytes, uint8) into the kernel's K-quant
    panels in one C++ pass; None where the kernel does not run here, the shape does not fit
    (n_out a multiple of 16, n_in of 256) or a block's d or dmin is not finite (the caller's
    checked path reports the file then)."""
    namespace = ops()
    if namespace is None or qtype_name not in GGUF_KQUANT_TYPES or n_out % 16 or n_in % 256:
        return None
    kind, bits, group = GGUF_KQUANT_TYPES[qtype_name]
    w, scale, d, dmin, finite = namespace.gguf_kpanels(data, kind, n_out, n_in)
    if not bool(finite):
        return None
    return KPanels(w, scale, d, None if bits == 6 else dmin, bits, group, n_out, n_in)
