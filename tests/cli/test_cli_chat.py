"""`mistral7b chat`: piped stdin, commands, context trimming, and a real terminal session."""

from __future__ import annotations

import time

from cli_helpers import TerminalSession, run_cli

USER = "user"
ASSISTANT = "assistant"


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def test_piped_conversation_with_commands_matches_api(llm):
    """Each reply equals what the Python API answers to the same conversation, so /system
    and /clear did exactly what they say (greedy decoding is deterministic)."""
    n = 8
    script = ("Hello\n"
              "/system You are a pirate.\n"
              "Who are you?\n"
              "/clear\n"
              "Hello\n")                       # no /bye: end of input ends the session
    result = run_cli("chat", "-n", str(n), input=script)
    assert result.returncode == 0, result.stderr

    def answer(messages):
        return llm.chat(messages, max_tokens=n).text

    pirate = msg("system", "You are a pirate.")
    # The REPL drops its cached KV at /system and /clear (README): so does the reference,
    # since the int4 kernel's results may differ in the last bits with and without reuse.
    r1 = answer([msg(USER, "Hello")])
    llm.clear_cache()
    r2 = answer([pirate, msg(USER, "Hello"), msg(ASSISTANT, r1), msg(USER, "Who are you?")])
    llm.clear_cache()
    r3 = answer([pirate, msg(USER, "Hello")])   # /clear keeps the system prompt
    assert r1 != r2 and r2 != r3                   # the commands changed the conversation
    assert result.stdout == f"{r1}\n{r2}\n{r3}\n"  # replies only: no prompt, no notices
    assert "(system prompt set)" in result.stderr
    assert "(conversation cleared)" in result.stderr


def test_context_overflow_drops_oldest_turn_and_bye_exits(llm):
    n, ctx = 16, 64
    script = "Tell me about Paris.\nAnd Rome?\n/bye\nThis is never answered.\n"
    result = run_cli("chat", "-n", str(n), "-c", str(ctx), input=script)
    assert result.returncode == 0, result.stderr
    r1 = llm.chat([msg(USER, "Tell me about Paris.")], max_tokens=n, max_context=ctx).text
    # The first turn plus the new message leave less than n tokens of the context: dropped.
    ids = llm.tokenizer.encode_chat([msg(USER, "Tell me about Paris."), msg(ASSISTANT, r1),
                                     msg(USER, "And Rome?")])
    assert len(ids) + n > ctx
    r2 = llm.chat([msg(USER, "And Rome?")], max_tokens=n, max_context=ctx).text
    assert result.stdout == f"{r1}\n{r2}\n"
    assert "warning:" in result.stderr and "dropped the oldest 1 turn" in result.stderr


def test_terminal_session_ctrl_c_and_ctrl_d():
    """At a terminal: Ctrl-C stops a long answer and the chat goes on; Ctrl-C at the prompt
    only hints; Ctrl-D exits with code 0."""
    term = TerminalSession("chat", "-n", "4000", "--ignore-eos")
    try:
        term.expect_text(b">>> ", since=0)
        for message in (b"Tell me a long story about a dragon.", b"Hi"):
            start = term.mark()
            term.send(message + b"\r")
            # The echoed line, then at least 40 bytes of the answer streaming in.
            term.expect(lambda out, m=message: m in out
                        and len(out.split(m, 1)[1].strip()) > 40, since=start)
            answering = term.mark()
            term.interrupt()
            term.expect_text(b">>> ", since=answering, timeout=60)   # back at the prompt
        at_prompt = term.mark()
        # Python's readline checks for signals only once it waits for a key: a SIGINT that
        # lands between printing the prompt and that wait is seen at the next key. A person
        # is never that fast; give the child a moment.
        time.sleep(1.0)
        term.interrupt()
        term.expect_text(b"Ctrl-C again", since=at_prompt, timeout=60)
        term.expect_text(b">>> ", since=at_prompt, timeout=60)
        term.send(b"\x04")
        assert term.wait() == 0, term.output[-2000:]
        assert b"Traceback" not in term.output
    finally:
        term.close()


def test_input_parsing_commands_and_blocks():
    import io
    from types import SimpleNamespace

    from mistral7b.cli.chat import ChatSession

    stdin = io.StringIO('one line\n/system be brief\n"""\nfirst\n  second\n"""\n'
                        '"""inline block"""\n"""start\nend"""\n')
    fake_llm = SimpleNamespace(config=SimpleNamespace(max_seq_len=4096))
    session = ChatSession(fake_llm, {}, stdin=stdin, stdout=io.StringIO())
    inputs = []
    while (item := session.next_input())[0] != "eof":
        inputs.append(item)
    assert inputs == [
        ("message", "one line"),
        ("command", "/system be brief"),
        ("message", "first\n  second"),
        ("message", "inline block"),
        ("message", "start\nend"),
    ]


def test_the_second_turn_prefills_only_the_new_turn(llm):
    """The REPL's timing summary (--verbose): the second turn takes the first turn's prompt
    and answer from the cache and computes only what is new."""
    import re

    n = 8
    result = run_cli("chat", "-n", str(n), "--verbose", input="Hello\nWhat is your name?\n")
    assert result.returncode == 0, result.stderr
    found = re.findall(r"prompt (\d+) tok(?: \((\d+) cached\))?", result.stderr)
    assert len(found) == 2, result.stderr
    (p1, c1), (p2, c2) = [(int(p), int(c or 0)) for p, c in found]
    first = [msg(USER, "Hello")]
    llm.clear_cache()                   # a cold first turn, as the CLI's
    r1 = llm.chat(first, max_tokens=n)
    ids1 = llm.tokenizer.encode_chat(first)
    ids2 = llm.tokenizer.encode_chat(first + [msg(ASSISTANT, r1.text),
                                              msg(USER, "What is your name?")])
    assert (p1, c1) == (len(ids1), 0)
    fed = len(ids1) + len(r1.token_ids) - (r1.finish_reason == "length")
    assert (p2, c2) == (len(ids2), fed)              # computed: only the new turn's tokens
