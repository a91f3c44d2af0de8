"""Export a model, LoRA adapters merged, as HF safetensors, Mistral consolidated or GGUF.

    import mistral7b
    mistral7b.export("ckpt/", to="gguf", out="model.Q4_0.gguf", type="q4_0", lora=["adapter/"])

(The package is `mistral7b.exporter`, so that `mistral7b.export` stays the function.)

- source.py: the source's tensors one at a time, adapters merged (the lora package's merge);
- hf.py / consolidated.py / gguf.py: one writer per target format;
- tokenizer.py: the source's tokenizer in each target's form.

Everything is written into a hidden sibling of `out` (`.NAME.partial-PID`) and renamed at the
end, so `out` never holds half a model: an error, Ctrl-C or a full disk removes the partial
output.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mistral7b.errors import InputError, ResourceError

if TYPE_CHECKING:
    from mistral7b.exporter.source import MergedSource
    from mistral7b.exporter.tokenizer import SourceTokenizer

TARGETS = ("hf", "consolidated", "gguf")
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
FLOAT_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Files that mark a folder as a model folder `force=True` may replace.
_MODEL_MARKERS = ("config.json", "params.json", "consolidated.safetensors", "model.safetensors")

LoraArg = str | Path | Sequence[str | Path | tuple[str | Path, float]] | None


def export(model: str | Path, *, to: str, out: str | Path, type: str | None = None,
           lora: LoraArg = None, force: bool = False, progress: bool = True,
           shard_bytes: int | None = None) -> Path:
    """Write `model` (a folder, a .gguf file or "default") with the adapters `lora` merged
    (a path, or a list of paths and (path, scale) pairs, as `load(lora=...)` takes) to `out`
    in format `to`: "hf" (a folder transformers loads), "consolidated" (a folder
    mistral-inference loads) or "gguf" (a file llama.cpp loads).

    type: "f32", "f16", "bf16" (any target) or "q8_0", "q4_0" (gguf only); default: the
    source's own float type (f16 for a quantized GGUF). `force` replaces an existing `out`
    (a file, or a folder holding a model). `progress` shows a bar on a terminal's stderr.
    Tensors are read, merged, converted and written one at a time: memory stays at about one
    tensor. Returns the path written. Raises InputError for a bad argument, ResourceError
    when the disk fills (the partial output is removed).
    """
    from mistral7b.default_model import default_model_path
    from mistral7b.exporter.source import MergedSource
    from mistral7b.exporter.tokenizer import SourceTokenizer
    from mistral7b.lora.multi import lora_specs
    from mistral7b.weights import open_checkpoint

    if to not in TARGETS:
        raise InputError(f"unknown export format {to!r}: use one of {', '.join(TARGETS)}")
    if type is not None and type not in TYPES:
        raise InputError(f"unknown export type {type!r}: use one of {', '.join(TYPES)}")
    if type in ("q8_0", "q4_0") and to != "gguf":
        raise InputError(f"type {type} is a GGUF block type: use --to gguf, or f32/f16/bf16 "
                         f"for --to {to}")
    out = Path(out).expanduser()
    _check_out(out, to, force)
    path = default_model_path() if str(model) == "default" else Path(model).expanduser()
    source = MergedSource(open_checkpoint(path), lora_specs(lora))
    kind = type or source.default_type()
    tokenizer = SourceTokenizer.of(source.reader)
    _check_space(out, source, kind)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    lines = _write(source, tokenizer, to, kind, partial, progress, shard_bytes)
    _replace(partial, out)
    for line in lines:
        if line:
            print(f"export: {line}", file=sys.stderr)
    return out


def _write(source: MergedSource, tokenizer: SourceTokenizer, to: str, kind: str, partial: Path, progress: bool,
           shard_bytes: int | None) -> list[str]:
    from mistral7b import progress as bars

    with bars.enabled(progress):
        bar = bars.bar(total=len(source.names), unit="tensor", desc=f"export {to} {kind}")

    def step(name: str) -> None:
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)

    try:
        if to == "gguf":
            from mistral7b.exporter.gguf import write_gguf

            return write_gguf(source, partial, kind, tokenizer, step)
        partial.mkdir()
        if to == "hf":
            from mistral7b.exporter.hf import DEFAULT_SHARD_BYTES, write_hf

            return write_hf(source, partial, FLOAT_TYPES[kind], tokenizer, step,
                            shard_bytes or DEFAULT_SHARD_BYTES)
        from mistral7b.exporter.consolidated import write_consolidated

        return write_consolidated(source, partial, FLOAT_TYPES[kind], tokenizer, step)
    except BaseException as exc:
        _remove(partial)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(f"{partial.parent}: the disk filled up while exporting "
                                f"({exc.strerror}); the partial output was removed. Free "
                                "some space or write elsewhere (-o)") from None
        raise
    finally:
        bar.close()


def _check_out(out: Path, to: str, force: bool) -> None:
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such folder for the output")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise InputError(f"{out} exists; choose another output path or pass --force "
                         "(force=True) to replace it")
    if out.is_dir() and not (any((out / m).exists() for m in _MODEL_MARKERS)
                             and all(f.is_file() for f in out.iterdir())):
        raise InputError(f"{out} is a folder that does not hold a model; --force only "
                         "replaces a model folder or a file")


def _check_space(out: Path, source: MergedSource, kind: str) -> None:
    """ResourceError before writing anything when the output cannot fit on its disk."""
    from mistral7b.exporter.gguf import tensor_kind

    bits = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 34 * 8 / 32, "q4_0": 18 * 8 / 32}
    need = sum(torch.Size(s).numel() * bits[tensor_kind(s, kind)] / 8
               for s in source.shapes.values())
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise ResourceError(f"{out.parent}: the export needs about {need / 1e9:.2f} GB and "
                            f"the disk has {free / 1e9:.2f} GB free; free some space or "
                            "write elsewhere (-o)")


def _replace(partial: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        _remove(out)
    partial.rename(out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


__all__ = ["TARGETS", "TYPES", "export"]
