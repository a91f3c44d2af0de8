"""Rendering a model's own Jinja chat template (HF `tokenizer_config.json`, GGUF metadata).

Templates come with downloaded files, so they run in Jinja's immutable sandbox: no attribute
starting with "_", no mutation of lists or dicts, no access to Python internals. A template
is also bounded in what it may cost: `*` and `**` may not build a string or list longer than
MAX_REPEAT items nor a number of more than MAX_POWER_BITS bits, and rendering stops after
MAX_RENDER_SECONDS (checked at every call, attribute and item access the template makes, so
nested `range` loops are caught too). The
environment mirrors what transformers' `apply_chat_template` gives a template (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII characters) so that templates written for HF render the same text here.
"""

from __future__ import annotations

import datetime
import functools
import json
import operator
import threading
import time
from typing import Any

from mistral7b.errors import TokenizerError

# The fallback for a model without a template: ChatML, as transformers used to default to.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# End-of-turn markers of common chat formats. When one of them is a token of the vocabulary
# and appears in the model's template, generation stops on it as well as on EOS.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

MAX_REPEAT = 1 << 20          # items a `*` may make ("-" * 80 is fine, "x" * 10**9 is not)
MAX_POWER_BITS = 4096         # bits of a `**` result
MAX_RENDER_SECONDS = 5.0      # a conversation renders in milliseconds

_deadline = threading.local()  # when the render running on this thread must stop


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which chat templates must not.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2 import Undefined
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class LoudUnsafeUndefined(Undefined):
        """An Undefined that fails when printed, iterated or tested if it stands for an
        attribute the sandbox refused (plain Undefined would render such an access as "")."""

        __slots__ = ()

        def _check(self) -> None:
            if self._undefined_exception is SecurityError:
                self._fail_with_undefined_error()

        def __str__(self) -> str:
            self._check()
            return super().__str__()

        def __iter__(self) -> Any:
            self._check()
            return super().__iter__()

        def __bool__(self) -> bool:
            self._check()
            return super().__bool__()

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox with a bound on time and on what `*` and `**` may build."""

        intercepted_binops = frozenset(["*", "**"])

        def _tick(self) -> None:
            if time.monotonic() > getattr(_deadline, "at", float("inf")):
                raise SecurityError(f"the template ran for more than {MAX_RENDER_SECONDS} s")

        def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
            self._tick()
            if op == "*":
                for seq, n in ((left, right), (right, left)):
                    if (isinstance(seq, (str, list, tuple)) and isinstance(n, int)
                            and len(seq) * n > MAX_REPEAT):
                        raise SecurityError(f"the template tried to repeat a sequence of "
                                            f"{len(seq)} items {n} times")
                return operator.mul(left, right)
            if (isinstance(left, int) and isinstance(right, int) and right > 0
                    and left.bit_length() * right > MAX_POWER_BITS):
                raise SecurityError(f"the template tried to compute {left} ** {right}")
            return operator.pow(left, right)

        def call(self, context: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
            self._tick()
            return super().call(context, obj, *args, **kwargs)

        def getattr(self, obj: Any, attribute: str) -> Any:
            self._tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            self._tick()
            return super().getitem(obj, argument)

    env = BoundedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[loopcontrols],
        undefined=LoudUnsafeUndefined,
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    from jinja2.exceptions import TemplateSyntaxError

    try:
        return _environment().from_string(template)
    except TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template does not parse: {e} (line {e.lineno})") from e


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """The text `template` makes of `messages`, rendered in the sandbox.

    `variables` are the other names templates expect: bos_token, eos_token, tools, ...
    Raises TokenizerError when the template raises (`raise_exception`, e.g. "roles must
    alternate"), fails, or tries something the sandbox forbids.
    """
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import SecurityError

    compiled = _compile(template)
    _deadline.at = time.monotonic() + MAX_RENDER_SECONDS
    try:
        return compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
    except SecurityError as e:
        raise TokenizerError(
            f"the chat template tried an operation the sandbox forbids and was stopped: {e}"
        ) from e
    except TemplateError as e:
        raise TokenizerError(f"the chat template rejected the conversation: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError,
            RecursionError, MemoryError, ZeroDivisionError) as e:
        raise TokenizerError(
            f"the chat template failed on this conversation: {type(e).__name__}: {str(e)[:200]}"
        ) from e
    finally:
        _deadline.at = float("inf")


def template_reads(template: str, name: str) -> bool:
    """Whether `template` uses the variable `name` (e.g. "tools") anywhere."""
    from jinja2 import meta
    from jinja2.exceptions import TemplateSyntaxError

    try:
        return name in meta.find_undeclared_variables(_environment().parse(template))
    except TemplateSyntaxError:
        return False        # rendering reports the syntax error itself


def end_of_turn_markers(template: str | None, vocab_lookup: Any) -> set[int]:
    """Ids of END_OF_TURN_MARKERS that `template` writes and the vocab has as one token.

    `vocab_lookup(token) -> int | None` maps a token string to its id.
    """
    ids = set()
    for marker in END_OF_TURN_MARKERS:
        if template is not None and marker in template:
            token_id = vocab_lookup(marker)
            if token_id is not None:
                ids.add(token_id)
    return ids
