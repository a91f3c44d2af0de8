"""Run each mutant in its own forked process under a time and memory limit, and classify it.

Outcome classes (issue 14):

    ok        the model loaded and its logits are finite (files), or the input was served
    rejected  a clean Mistral7BError (its message and the time it took are kept)
    defect    anything else: another exception, non-finite logits, a forged chat turn, a
              hang (no answer within the time limit) or a crash (killed by a signal, out of
              memory under the address-space limit)

The parent imports torch and mistral7b (and loads the model the chat/JSONL targets use) once,
then forks a child per mutant: a child starts in ~10 ms, cannot take the parent down, and is
killed when it overruns. Its address space is capped (RLIMIT_AS) at what it had at the fork
plus `memory_mb`, and its peak RSS growth is reported (VmHWM over VmRSS at its start; a
child that dies before answering: wait4's ru_maxrss over the parent's RSS).
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import resource
import select
import signal
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OK, REJECTED, DEFECT = "ok", "rejected", "defect"
# A small KV cache for the models the children run: the default budget (half the host's
# memory) would not fit the children's address-space limit.
KV_BYTES = 32 << 20


class Defect(Exception):
    """Raised by a target for an outcome that is wrong without an exception (NaN logits)."""


@dataclass
class Result:
    target: str
    index: int
    outcome: str
    detail: str
    seconds: float
    rss_growth_mb: float


@dataclass
class Summary:
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    defects: list[Result] = field(default_factory=list)
    slowest_rejection: dict[str, Result] = field(default_factory=dict)
    max_rss_growth_mb: dict[str, float] = field(default_factory=dict)

    def add(self, r: Result) -> None:
        self.counts.setdefault(r.target, Counter())[r.outcome] += 1
        if r.outcome == DEFECT:
            self.defects.append(r)
        if r.outcome == REJECTED:
            slowest = self.slowest_rejection.get(r.target)
            if slowest is None or r.seconds > slowest.seconds:
                self.slowest_rejection[r.target] = r
        self.max_rss_growth_mb[r.target] = max(self.max_rss_growth_mb.get(r.target, 0.0),
                                               r.rss_growth_mb)

    def table(self) -> str:
        lines = [(f"{'target':<14}{'mutants':>9}{'ok':>8}{'rejected':>10}{'defects':>9}"
                  f"{'slowest rejection (s)':>23}{'max RSS growth (MB)':>21}")]
        for target, c in self.counts.items():
            slow = self.slowest_rejection.get(target)
            lines.append(f"{target:<14}{sum(c.values()):>9}{c[OK]:>8}{c[REJECTED]:>10}"
                         f"{c[DEFECT]:>9}{(slow.seconds if slow else 0):>23.3f}"
                         f"{self.max_rss_growth_mb.get(target, 0):>21.1f}")
        return "\n".join(lines)


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class _Child:
    target: str
    index: int
    pid: int
    fd: int
    started: float
    deadline: float
    parent_rss_kb: int
    chunks: list[bytes] = field(default_factory=list)


def _spawn(target: str, index: int, fn: Callable[[], Any], *, timeout_s: float,
           memory_mb: int) -> _Child:
    """Fork a child that runs `fn` and writes its outcome to a pipe as JSON."""
    from mistral7b.errors import Mistral7BError

    parent_rss = _rss_kb()
    read_fd, write_fd = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_fd)
        code = 0
        # A forked child must not enter the OpenMP pool the parent may have started (GNU
        # OpenMP deadlocks after fork): one thread, as PyTorch's DataLoader workers do.
        import torch

        torch.set_num_threads(1)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # nor the tokenizers thread pool
        faulthandler.disable()                 # a crash is reported by the parent, quietly
        os.environ["RUST_BACKTRACE"] = "0"
        warnings.simplefilter("ignore")        # e.g. "pre-tokenizer 'nope' is not known"
        try:
            limit = _vm_size() + memory_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            rss_start = _status_kb("VmRSS")
            t0 = time.perf_counter()
            try:
                fn()
                outcome, detail = OK, ""
            except Mistral7BError as exc:
                outcome, detail = REJECTED, f"{type(exc).__name__}: {exc}"
            except BaseException as exc:  # noqa: BLE001 - that is what the fuzzer looks for
                tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
                outcome = DEFECT
                detail = f"{type(exc).__name__}: {str(exc)[:300]}\n{''.join(tb[-3:])[-1500:]}"
            payload = {"outcome": outcome, "detail": detail[:2000],
                       "seconds": time.perf_counter() - t0,
                       # peak resident memory over what the child had at the fork
                       "rss_growth_mb": (_status_kb("VmHWM") - rss_start) / 1024}
            os.write(write_fd, json.dumps(payload, ensure_ascii=True).encode())
        except BaseException:  # noqa: BLE001 - a child must never return into the parent's loop
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    return _Child(target, index, pid, read_fd, started, time.monotonic() + timeout_s,
                  parent_rss)


def _finish(child: _Child, hung: bool, timeout_s: float) -> Result:
    if hung:
        os.kill(child.pid, signal.SIGKILL)
    os.close(child.fd)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - child.started
    growth = max(0.0, (usage.ru_maxrss - child.parent_rss_kb) / 1024)
    if hung:
        return Result(child.target, child.index, DEFECT,
                      f"hang: no answer within {timeout_s} s", seconds, growth)
    try:
        payload = json.loads(b"".join(child.chunks))
    except ValueError:
        why = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exited with {os.WEXITSTATUS(status)} without an answer")
        return Result(child.target, child.index, DEFECT, f"crash: {why}", seconds, growth)
    return Result(child.target, child.index, payload["outcome"], payload["detail"],
                  payload["seconds"], max(growth, payload["rss_growth_mb"]))


def _wait_any(children: dict[int, _Child], timeout_s: float) -> list[Result]:
    """Wait until at least one child answered, ended or overran; return those results."""
    now = time.monotonic()
    expired = [c for c in children.values() if c.deadline <= now]
    done = [_finish(children.pop(c.fd), True, timeout_s) for c in expired]
    if done or not children:
        return done
    wait = max(0.0, min(c.deadline for c in children.values()) - now)
    ready, _, _ = select.select(list(children), [], [], wait)
    for fd in ready:
        data = os.read(fd, 1 << 16)
        if data:
            children[fd].chunks.append(data)
        else:
            done.append(_finish(children.pop(fd), False, timeout_s))
    return done


def run_one(target: str, index: int, fn: Callable[[], Any], *, timeout_s: float,
            memory_mb: int) -> Result:
    """Run `fn` in a forked child; its return value is ignored, its exception classified."""
    child = _spawn(target, index, fn, timeout_s=timeout_s, memory_mb=memory_mb)
    children = {child.fd: child}
    while True:
        done = _wait_any(children, timeout_s)
        if done:
            return done[0]


# --------------------------------------------------------------------------- targets


class Targets:
    """The fuzz targets over seeds written under `workdir`. `make(target, i)` returns the
    function a child runs for mutant i (its files are written by the parent, so a defect's
    file stays on disk to reproduce it)."""

    FILE_TARGETS = ("gguf", "tokenizer", "safetensors", "config.json", "params.json")
    INPUT_TARGETS = ("chat", "jsonl")

    def __init__(self, workdir: Path, seed: int = 0) -> None:
        import fuzz_seeds

        import mistral7b

        self.workdir = workdir
        self.seed = seed
        self.seeds = fuzz_seeds.write_all(workdir / "seeds")
        self.gguf_bytes = {k: self.seeds[k].read_bytes() for k in ("gguf_f32", "gguf_q")}
        self.st_bytes = (self.seeds["hf"] / "model.safetensors").read_bytes()
        self.hf_config = fuzz_seeds.hf_config()
        self.params = fuzz_seeds.params_json()
        # The chat and JSONL targets share one model, loaded before the children fork.
        self.llm = mistral7b.load(self.seeds["gguf_f32"], dtype="float32",
                                  kv_cache_memory=KV_BYTES)

    def rng(self, target: str, i: int) -> random.Random:
        return random.Random(f"{self.seed}/{target}/{i}")

    def make(self, target: str, i: int) -> Callable[[], Any]:
        rng = self.rng(target, i)
        out = self.workdir / "mutants" / target / str(i % 64)
        out.mkdir(parents=True, exist_ok=True)
        return getattr(self, "_" + target.replace(".", "_"))(rng, out)

    # Each returns the child's work. `quant` varies the load path of GGUF mutants: float
    # (dequantized), or int8 / int4 from the file's own blocks.

    def _gguf(self, rng: random.Random, out: Path) -> Callable[[], Any]:
        import fuzz_mutate
        import fuzz_seeds
        from gguf import GGUFValueType as T

        seed = rng.choice(["gguf_f32", "gguf_q"])
        path = out / "m.gguf"
        if rng.random() < 0.25:  # a metadata value of another type or range, via the writer
            key = rng.choice(["llama.block_count", "llama.context_length",
                              "llama.embedding_length", "llama.feed_forward_length",
                              "llama.attention.head_count", "llama.attention.head_count_kv",
                              "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
                              "llama.attention.sliding_window", "llama.vocab_size",
                              "llama.attention.key_length", "general.architecture",
                              "general.alignment"])
            value = rng.choice([(2**31, T.UINT32), (2**32 - 1, T.UINT32), (0, T.UINT32),
                                (2**63, T.UINT64), (-5, T.INT32), (float("nan"), T.FLOAT32),
                                (float("inf"), T.FLOAT32), (0.0, T.FLOAT32), (1e-45, T.FLOAT32),
                                (-1.0, T.FLOAT32), (1e30, T.FLOAT64), ("32", T.STRING),
                                ("mistral", T.STRING), ("", T.STRING), ([1, 2], T.ARRAY),
                                (True, T.BOOL), (7, T.UINT8), (3, T.UINT32), (64, T.UINT32)])
            fuzz_seeds.write_gguf(path, quantized=seed == "gguf_q", metadata={key: value})
        else:
            path.write_bytes(fuzz_mutate.gguf_mutant(rng, self.gguf_bytes[seed]))
        quant = rng.choice([None, None, "int8", "int4"]) if seed == "gguf_q" else None
        return lambda: _load_and_check(path, quant=quant)

    def _tokenizer(self, rng: random.Random, out: Path) -> Callable[[], Any]:
        import fuzz_mutate
        import fuzz_seeds
        from gguf import GGUFValueType as T

        path = out / "m.gguf"
        if rng.random() < 0.5:
            tokens, types, _ = fuzz_seeds.vocabulary()
            name, value = rng.choice([
                ("model", "llama"), ("model", "bert"), ("model", ""), ("pre", "nope"),
                ("pre", "llama-bpe"), ("tokens", tokens[:10]), ("tokens", []),
                ("tokens", [*tokens, tokens[5]]), ("token_type", types[:-1]),
                ("token_type", [9] * len(types)), ("merges", ["ab"]), ("merges", []),
                ("merges", ["Ġ zz"]), ("bos_token_id", 10**6), ("eos_token_id", 2**32 - 1),
                ("eos_token_id", None), ("add_bos_token", True), ("chat_template", "{% x"),
                ("chat_template", "{{ messages[0].__class__ }}"),
                ("chat_template", "{{ raise_exception('no') }}"),
                ("chat_template", "{% for m in messages %}{{ m.content * 1000000 }}{% endfor %}"),
                ("chat_template", ""), ("scores", [float("nan")] * len(tokens)),
                ("unknown_token_id", ([3], T.ARRAY)), ("tokens", None),
            ])
            wrong_type = rng.random() < 0.3 and name not in ("unknown_token_id",)
            if wrong_type:
                value = rng.choice([5, "x", [1, 2], 1.5, True])
                fuzz_seeds.write_gguf(path, tokenizer={name: None, "unknown_token_id": None})
                data = _add_kv(path.read_bytes(), f"tokenizer.ggml.{name}", value)
                path.write_bytes(data)
            else:
                fuzz_seeds.write_gguf(path, tokenizer={name: value})
        else:
            path.write_bytes(fuzz_mutate.tokenizer_bytes_mutant(rng, self.gguf_bytes["gguf_f32"]))
        return lambda: _load_and_check(path, chat=True)

    def _safetensors(self, rng: random.Random, out: Path) -> Callable[[], Any]:
        import fuzz_mutate

        folder = out / "hf"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.hf_config))
        (folder / "model.safetensors").write_bytes(
            fuzz_mutate.safetensors_mutant(rng, self.st_bytes))
        return lambda: _load_and_check(folder)

    def _config_json(self, rng: random.Random, out: Path) -> Callable[[], Any]:
        import fuzz_mutate

        folder = out / "hf"
        folder.mkdir(exist_ok=True)
        st = folder / "model.safetensors"
        if not st.exists():
            st.symlink_to(self.seeds["hf"] / "model.safetensors")
        (folder / "config.json").write_bytes(fuzz_mutate.json_mutant(rng, self.hf_config))
        return lambda: _load_and_check(folder)

    def _params_json(self, rng: random.Random, out: Path) -> Callable[[], Any]:
        import fuzz_mutate

        folder = out / "consolidated"
        folder.mkdir(exist_ok=True)
        st = folder / "consolidated.safetensors"
        if not st.exists():
            st.symlink_to(self.seeds["consolidated"] / "consolidated.safetensors")
        (folder / "params.json").write_bytes(fuzz_mutate.json_mutant(rng, self.params))
        return lambda: _load_and_check(folder)

    def _chat(self, rng: random.Random, out: Path) -> Callable[[], Any]:
        import fuzz_mutate

        messages = fuzz_mutate.messages(rng)
        llm = self.llm
        return lambda: _chat_and_check(llm, messages)

    def _jsonl(self, rng: random.Random, out: Path) -> Callable[[], Any]:
        import fuzz_mutate

        path = out / "train.jsonl"
        path.write_bytes(fuzz_mutate.jsonl_mutant(rng))
        tok = self.llm.tokenizer

        def run() -> None:
            from mistral7b.finetune.data import read_records, tokenize

            tokenize(read_records(path), tok, max_len=64, path=path)

        return run


def _add_kv(data: bytes, key: str, value: Any) -> bytes:
    """The GGUF `data` with one more key/value (any JSON-ish value, typed as GGUF would)."""
    import struct

    from gguf import GGUFValueType as T

    def encode(v: Any) -> tuple[int, bytes]:
        if isinstance(v, bool):
            return T.BOOL, struct.pack("<B", v)
        if isinstance(v, int):
            return T.INT32, struct.pack("<i", v)
        if isinstance(v, float):
            return T.FLOAT32, struct.pack("<f", v)
        if isinstance(v, str):
            raw = v.encode()
            return T.STRING, struct.pack("<Q", len(raw)) + raw
        items = [encode(x) for x in v]
        kind = items[0][0] if items else T.INT32
        return T.ARRAY, struct.pack("<IQ", kind, len(items)) + b"".join(b for _, b in items)

    import fuzz_mutate

    fields, data_start, _ = fuzz_mutate.gguf_fields(data)
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    kind, payload = encode(value)
    kv = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + payload
    header = data[:16] + struct.pack("<Q", n_kv + 1)
    # The new key/value goes after the others, before the first tensor info.
    first_tensor = min(at for at, _, what in fields if what == "tensor name.len")
    infos_end = max(at + size for at, size, _ in fields)
    body = data[24:first_tensor] + kv + data[first_tensor:infos_end]
    pad = -(len(header) + len(body)) % 32
    return header + body + b"\x00" * pad + data[data_start:]


def _load_and_check(path: Path, quant: str | None = None, chat: bool = False) -> None:
    import torch

    import mistral7b

    llm = mistral7b.load(path, dtype="float32", quant=quant, kv_cache_memory=KV_BYTES)
    tok = llm.tokenizer
    ids = tok.encode("The sky is blue 🦙", bos=True) if tok is not None else [1, 2, 3]
    if not ids:
        ids = [0]
    logits = llm.logits(ids[:12])
    if not bool(torch.isfinite(logits).all()):
        raise Defect("the model loaded but its logits are not finite")
    if tok is not None and chat:
        tok.decode(ids)
        chat_ids = tok.encode_chat([{"role": "user", "content": "hi <|im_end|>"}])
        llm.generate(chat_ids[-50:], max_tokens=2, temperature=0.0)


def _chat_and_check(llm: Any, messages: Any) -> None:
    """Answer the conversation; a message's control-token text must never add a turn."""
    ids = llm.tokenizer.encode_chat(messages)
    start = llm.tokenizer.backend.token_to_id("<|im_start|>")
    # ChatML: one <|im_start|> per message, and one for the reply.
    if ids.count(start) != len(messages) + 1:
        raise Defect(f"{ids.count(start)} turns for {len(messages)} messages: a forged turn")
    llm.chat(messages, max_tokens=2, temperature=0.0)


def run(targets: Targets, counts: dict[str, int], *, timeout_s: float = 10.0,
        memory_mb: int = 1024, jobs: int = 1, save_defects: Path | None = None,
        progress: Callable[[Result], None] | None = None) -> Summary:
    """`counts[target]` mutants of each target, one child each, `jobs` at a time. Mutant i
    of a target is the same whatever `jobs` is (its generator is seeded by target and i)."""
    from collections import deque

    summary = Summary()
    pending = deque((t, i) for t, n in counts.items() for i in range(n))
    children: dict[int, _Child] = {}
    while pending or children:
        while pending and len(children) < jobs:
            target, i = pending.popleft()
            fn = targets.make(target, i)
            child = _spawn(target, i, fn, timeout_s=timeout_s, memory_mb=memory_mb)
            children[child.fd] = child
        for result in _wait_any(children, timeout_s):
            summary.add(result)
            if result.outcome == DEFECT and save_defects is not None:
                _save(targets.workdir / "mutants" / result.target / str(result.index % 64),
                      save_defects / result.target / str(result.index))
            if progress is not None:
                progress(result)
    return summary


def _save(src: Path, dst: Path) -> None:
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
