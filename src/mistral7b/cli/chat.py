"""`mistral7b chat`: an interactive conversation, replies streamed to stdout.

At a terminal it shows a `>>> ` prompt (with line editing and history); with piped stdin it
answers each line (or `\"\"\"` block) and exits at end of input, printing only the replies,
one per message, each followed by a newline.

Keys, as in ollama / llama.cpp:
- Ctrl-C while the model answers stops the answer; what it said so far stays in the
  conversation and the prompt comes back.
- Ctrl-C at the prompt drops the line being typed; a second Ctrl-C in a row exits (code 0).
- Ctrl-D (end of input) at the prompt exits (code 0).

Context: before each turn, when the conversation plus room for the answer (the smaller of
-n and half the context) would not fit in the context, the oldest turns are dropped, with a
warning on stderr.

Each turn is sent as the conversation (`LLM.stream_chat`): the previous answer's KV is reused
on the model's own tokens (chat_history.py), so a turn computes only its new message.
`/set`, `/show`, `/save` and `/load` are in chat_commands.py.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING, Any, TextIO

from mistral7b.api_client import ServerGone, ServerUnreachable
from mistral7b.cli import chat_commands, common, remote
from mistral7b.errors import Mistral7BError

if TYPE_CHECKING:
    from mistral7b.api import LLM

DEFAULT_MAX_TOKENS = 1024
PROMPT = ">>> "
CONTINUATION = "... "
BLOCK = '"""'

HELP = f"""commands:
  /help           this list
  /clear          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt; /system alone removes it
{chat_commands.HELP}
  /bye            exit (as do Ctrl-D, and Ctrl-C twice at the prompt)
  {BLOCK}             on a line of its own: begin a multi-line message, end it with {BLOCK}
Ctrl-C while the model answers stops the answer; what it said stays in the conversation."""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "chat", help="talk with the model (interactive; also reads piped stdin)",
        description="Chat with the model in its chat format. Replies stream to stdout; "
                    "messages, warnings and timings go to stderr. Piped stdin: each line (or "
                    f"{BLOCK} block) is one message; only the replies are printed.",
        epilog=f"{HELP}\nCtrl-C at the prompt drops the line; Ctrl-C twice in a row or Ctrl-D "
               "exits (code 0).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--safe", action="store_true",
                   help="add the Mistral guardrail system prompt (safe_prompt)")
    p.add_argument("--verbose", action="store_true",
                   help="print timings after each answer (stderr)")
    common.add_structured_args(p)
    common.add_model_args(p)
    common.add_tp_arg(p)
    common.add_lora_arg(p)
    common.add_sampling_args(p, max_tokens=DEFAULT_MAX_TOKENS)
    remote.add_client_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    sampling = common.sampling_kwargs(args)
    response_format = common.read_response_format(args)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    served = remote.pick_server(args)
    llm: LLM | remote.ServedModel
    if served is not None:
        llm = remote.ServedModel(served, args.json_schema or args.grammar)
        if response_format is not None:
            sampling["response_format"] = response_format
        ready = f"answering through {served.where}"
    else:
        llm = common.load_model(args, quiet=not (interactive or args.verbose))
        common.use_response_format(llm, args, response_format, sampling)
        ready = f"loaded in {llm.load_seconds:.1f} s"
    session = ChatSession(llm, sampling, system=args.system, safe=args.safe, ctx=args.ctx,
                          verbose=args.verbose, interactive=interactive)
    if interactive:
        if importlib.util.find_spec("readline") is not None:
            importlib.import_module("readline")  # gives input() line editing and history
        common.log(f"{ready}; /help for commands, /bye or Ctrl-D to exit")
    return session.run()


class ChatSession:
    """The conversation, the input loop and one streamed answer per user message."""

    def __init__(self, llm: LLM | remote.ServedModel, sampling: dict[str, Any], *, system: str | None = None,
                 safe: bool = False, ctx: int | None = None, verbose: bool = False,
                 interactive: bool = False, stdin: TextIO | None = None,
                 stdout: TextIO | None = None) -> None:
        self.llm = llm
        self.sampling = sampling
        self.initial_sampling = dict(sampling)      # what `/set NAME default` puts back
        self.system = system or None
        self.safe = safe
        self.ctx = ctx or llm.config.max_seq_len
        self.verbose = verbose
        self.interactive = interactive
        self.stdin = stdin or sys.stdin
        self.out = stdout or sys.stdout
        self.turns: list[dict[str, str]] = []   # user/assistant messages, oldest first
        max_tokens = sampling.get("max_tokens", DEFAULT_MAX_TOKENS)
        # Room kept for the answer when old turns are dropped: -n, but never more than half
        # the context, so a big -n with a small -c still leaves some history.
        self.answer_room = min(max_tokens, self.ctx // 2)

    # ---------------------------------------------------------------- the loop

    def run(self) -> int:
        interrupted_at_prompt = False
        while True:
            try:
                kind, text = self.next_input()
            except KeyboardInterrupt:
                if not self.interactive:
                    raise
                if interrupted_at_prompt:
                    self._newline()
                    return 0
                interrupted_at_prompt = True
                common.log("\n(Ctrl-C again, Ctrl-D or /bye to exit)")
                continue
            interrupted_at_prompt = False
            if kind == "eof":
                self._newline()
                return 0
            if kind == "command":
                if self.command(text) == "bye":
                    return 0
            elif text.strip():
                self.answer(text)

    def command(self, line: str) -> str | None:
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if name in ("/bye", "/exit", "/quit"):
            return "bye"
        if name in ("/help", "/?"):
            common.log(HELP)
        elif name == "/clear":
            self.turns.clear()
            self.llm.clear_cache()       # the old conversation's KV is of no more use
            common.log("(conversation cleared)")
        elif name == "/system":
            self.set_system(rest or None)
        elif name in chat_commands.COMMANDS:
            chat_commands.COMMANDS[name](self, rest)
        else:
            common.log(f"unknown command {name!r}: /help lists the commands")
        return None

    def set_system(self, text: str | None) -> None:
        self.system = text
        self.llm.clear_cache()           # every later prompt starts differently
        common.log("(system prompt set)" if text else "(system prompt removed)")

    def update_sampling(self, changes: dict[str, Any]) -> None:
        """Apply /set changes (None: back to the default); InputError leaves all as it was."""
        self.sampling = chat_commands.merged_sampling(self.sampling, changes,
                                                      self.initial_sampling)
        self.answer_room = min(self.sampling.get("max_tokens", DEFAULT_MAX_TOKENS),
                               self.ctx // 2)

    def replace_conversation(self, system: str | None, turns: list[dict[str, str]],
                             sampling: dict[str, Any] | None) -> None:
        """/load: take another conversation, after checking the chat format accepts it."""
        old = (self.system, self.turns)
        self.system, self.turns = system, turns
        try:
            if turns:
                self.encode()
        except Exception:
            self.system, self.turns = old
            raise
        if sampling is not None:
            self.sampling = sampling
            self.update_sampling({})
        self.llm.clear_cache()

    # ---------------------------------------------------------------- input

    def next_input(self) -> tuple[str, str]:
        """("eof", "") | ("command", line) | ("message", text); raises KeyboardInterrupt."""
        line = self.read_line(PROMPT)
        if line is None:
            return "eof", ""
        if line.startswith("/"):
            return "command", line
        if not line.lstrip().startswith(BLOCK):
            return "message", line
        first = line.lstrip()[len(BLOCK):]
        if first.rstrip().endswith(BLOCK):                 # """one line"""
            return "message", first.rstrip()[: -len(BLOCK)]
        lines = [first] if first.strip() else []
        while (line := self.read_line(CONTINUATION)) is not None:
            if line.rstrip().endswith(BLOCK):
                lines.append(line.rstrip()[: -len(BLOCK)])
                break
            lines.append(line)
        return "message", "\n".join(lines).strip("\n")

    def read_line(self, prompt: str) -> str | None:
        """One line without its newline, or None at end of input."""
        if not self.interactive:
            line = self.stdin.readline()
            return line.rstrip("\r\n") if line else None
        try:
            if self.out.isatty():
                return input(prompt)
            # Replies go to a file or pipe: keep the prompt out of them.
            sys.stderr.write(prompt)
            sys.stderr.flush()
            return input()
        except EOFError:
            return None

    # ---------------------------------------------------------------- answers

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def encode(self) -> list[int]:
        return self.llm.require_tokenizer().encode_chat(
            self.messages(), add_generation_prompt=True, safe_prompt=self.safe)

    def fit_context(self) -> None:
        """Drop the oldest turns that would leave less than `answer_room` tokens of the
        context for the answer."""
        ids = self.encode()
        budget = self.ctx - self.answer_room
        dropped = 0
        while len(ids) > budget and len(self.turns) > 1:
            del self.turns[0]                           # the oldest user message ...
            if self.turns and self.turns[0]["role"] == "assistant":
                del self.turns[0]                       # ... and its answer
            dropped += 1
            ids = self.encode()
        if dropped:
            common.log(f"warning: the conversation did not fit in the context of {self.ctx} "
                       f"tokens with room for {self.answer_room} answer tokens: dropped the "
                       f"oldest {dropped} turn(s)")
        if len(ids) > budget:
            common.log(f"warning: this message takes {len(ids)} of the {self.ctx} context "
                       f"tokens: the answer can have at most {max(self.ctx - len(ids), 0)}")

    def answer(self, text: str) -> None:
        self.turns.append({"role": "user", "content": text})
        parts: list[str] = []
        interrupted = False
        try:
            self.fit_context()
            stream = self.llm.stream_chat(self.messages(), safe_prompt=self.safe,
                                          max_context=self.ctx, **self.sampling)
            try:
                for delta in stream:
                    self.out.write(delta)
                    self.out.flush()
                    parts.append(delta)
            except KeyboardInterrupt:
                stream.close()
                if not self.interactive:
                    raise                               # piped input: Ctrl-C ends the run
                interrupted = True
        except (ServerGone, ServerUnreachable):
            raise                                       # no server: the session cannot go on
        except Mistral7BError as exc:
            # The conversation goes on: report, forget the message that failed.
            self.turns.pop()
            common.log(f"error: {exc}")
            return
        reply = "".join(parts)
        self.out.write("\n\n" if self.interactive else "\n")
        self.out.flush()
        if interrupted and not reply:
            self.turns.pop()                            # nothing was said: as if never asked
        else:
            self.turns.append({"role": "assistant", "content": reply})
        if self.verbose and not interrupted:
            common.log(self.llm.summary_line() if isinstance(self.llm, remote.ServedModel)
                       else common.summary_line(common.timings(self.llm), load=False))

    def _newline(self) -> None:
        if self.interactive:
            self.out.write("\n")
            self.out.flush()
