"""Helpers for the command-line tests: they run the real `mistral7b` in a subprocess."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

from reference_files import SMOLLM2_JSON

# tests/reference (DESIGN §8): llama.cpp's outputs on the default model.
REFERENCE = SMOLLM2_JSON
CLI = [sys.executable, "-m", "mistral7b.cli.main"]
TIMEOUT = 240  # seconds; a model-loading run takes ~5-15 s on the 2-core machines


def run_cli(*args: str, input: str | None = None, env: dict[str, str] | None = None,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """`mistral7b ARGS...` with `input` on stdin (else /dev/null, never the test's TTY)."""
    stdin = None if input is not None else subprocess.DEVNULL
    return subprocess.run([*CLI, *args], check=False, input=input, stdin=stdin,
                          capture_output=True, text=True, env=env or cli_env(), timeout=timeout)


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", **extra)
    return env


def assert_user_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit code 2 and exactly one stderr line `error: ...` (no traceback); returns it."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


class TerminalSession:
    """The command run with a pseudo-terminal as its stdin/stdout/stderr, as at a shell.

    Ctrl-C is sent as SIGINT to the child (it has no controlling terminal, so the byte \\x03
    would not raise one); Ctrl-D is the byte \\x04, which readline reads as end of input.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        master, slave = os.openpty()
        self.proc = subprocess.Popen([*CLI, *args], stdin=slave, stdout=slave, stderr=slave,
                                     env=env or cli_env(TERM="dumb"), start_new_session=True)
        os.close(slave)
        self.fd = master
        self.output = b""

    def mark(self) -> int:
        return len(self.output)

    def expect(self, done, timeout: float = TIMEOUT, since: int = 0) -> bytes:
        """Read until done(output[since:]) is true; return that part of the output."""
        deadline = time.monotonic() + timeout
        while not done(self.output[since:]):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; output so far: {self.output[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:        # EIO: the child closed the terminal
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"exited {self.proc.returncode}: {self.output[-2000:]!r}")
                self.output += chunk
        return self.output[since:]

    def expect_text(self, text: bytes, since: int, timeout: float = TIMEOUT) -> bytes:
        return self.expect(lambda out: text in out, timeout, since)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.output += os.read(self.fd, 65536)
                except OSError:
                    pass
        return self.proc.wait(timeout=1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)
