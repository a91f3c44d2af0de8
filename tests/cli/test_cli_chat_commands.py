"""The chat REPL's /set, /show, /save and /load, piped and at a terminal."""

from __future__ import annotations

import json
import re

from cli_helpers import TerminalSession, run_cli


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def stats(stderr: str) -> list[tuple[int, int]]:
    """(prompt tokens, generated tokens) of each answer, from the --verbose timing lines."""
    found = re.findall(r"prompt (\d+) tok.*generated (\d+) tok", stderr)
    return [(int(p), int(g)) for p, g in found]


def test_set_changes_the_next_answers_and_bad_values_change_nothing(llm):
    script = ("/set parameter num_predict 3\n"
              "Hello\n"
              "/set temperature warm\n"          # refused: not a number
              "/set top_p 7\n"                   # refused: out of range
              "/set colour blue\n"               # refused: unknown
              "/set max_tokens default\n"        # back to -n
              "What is your name?\n")
    result = run_cli("chat", "-n", "9", "--ignore-eos", "--verbose", input=script)
    assert result.returncode == 0, result.stderr
    assert [g for _, g in stats(result.stderr)] == [3, 9]
    assert "temperature must be a number, got 'warm'" in result.stderr
    assert "top_p" in result.stderr and "unknown setting 'colour'" in result.stderr
    assert "Traceback" not in result.stderr


def test_show_reports_model_settings_system_and_context(llm):
    script = "/set temperature 0.5\n/set system Be brief.\nHello\n/show\n/show nonsense\n"
    result = run_cli("chat", "-n", "4", "--seed", "1", input=script)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert f"{llm.config.n_params / 1e9:.2f}B" in err and "window" in err
    assert "temperature          0.5" in err and "seed                 1" in err
    assert "system prompt: Be brief." in err
    reply = result.stdout.strip("\n")
    used = len(llm.tokenizer.encode_chat([msg("system", "Be brief."), msg("user", "Hello"),
                                          msg("assistant", reply)]))
    assert f"context: 2 message(s), {used} of {llm.config.max_seq_len} tokens" in err
    assert "unknown /show 'nonsense'" in err


def test_save_then_load_continues_the_conversation(llm, tmp_path):
    saved = tmp_path / "talk.json"
    first = run_cli("chat", "-n", "6", input=f"/set system Be brief.\nHello\n/save {saved}\n")
    assert first.returncode == 0, first.stderr
    data = json.loads(saved.read_text())
    reply = first.stdout.strip("\n")
    assert data["system"] == "Be brief."
    assert data["messages"] == [msg("user", "Hello"), msg("assistant", reply)]
    assert data["settings"] == {"max_tokens": 6}

    # A new session loads it (its settings too): the model is shown the whole talk.
    second = run_cli("chat", "-n", "50", "--ignore-eos", "--verbose",
                     input=f"/load {saved}\nAnd then?\n")
    assert second.returncode == 0, second.stderr
    assert "loaded 2 message(s)" in second.stderr
    talk = [msg("system", "Be brief."), msg("user", "Hello"), msg("assistant", reply),
            msg("user", "And then?")]
    assert stats(second.stderr) == [(len(llm.tokenizer.encode_chat(talk)), 6)]


def test_load_refuses_bad_files_and_keeps_the_conversation(llm, tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    bad_role = tmp_path / "role.json"
    bad_role.write_text(json.dumps([{"role": "wizard", "content": "hi"}]))
    bad_setting = tmp_path / "setting.json"
    bad_setting.write_text(json.dumps({"messages": [], "settings": {"top_p": 9}}))
    script = (f"Hello\n/load {bad_json}\n/load {bad_role}\n/load {bad_setting}\n"
              f"/load {tmp_path / 'missing.json'}\n/save {tmp_path / 'no' / 'dir.json'}\n"
              "What is your name?\n")
    result = run_cli("chat", "-n", "5", "--ignore-eos", "--verbose", input=script)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "not a JSON conversation" in err and "message 0 must be" in err
    assert "top_p" in err and "could not read" in err and "could not save" in err
    r1 = result.stdout.split("\n")[0]
    talk = [msg("user", "Hello"), msg("assistant", r1), msg("user", "What is your name?")]
    # The second answer saw the first turn: the conversation went on unharmed.
    assert stats(err)[1] == (len(llm.tokenizer.encode_chat(talk)), 5)


def test_commands_at_a_terminal(tmp_path):
    saved = tmp_path / "t.json"
    term = TerminalSession("chat", "-n", "4")
    try:
        term.expect_text(b">>> ", since=0)
        for line, shows in ((b"/set num_predict 2", b"(set num_predict to 2)"),
                            (b"/show parameters", b"max_tokens           2"),
                            (b"Hi", b">>> "),
                            (f"/save {saved}".encode(), b"saved 2 message(s)"),
                            (b"/help", b"/load FILE")):
            start = term.mark()
            term.send(line + b"\r")
            term.expect_text(shows, since=start, timeout=60)
        term.send(b"/bye\r")
        assert term.wait() == 0, term.output[-2000:]
        assert b"Traceback" not in term.output
        assert json.loads(saved.read_text())["settings"] == {"max_tokens": 2}
    finally:
        term.close()
