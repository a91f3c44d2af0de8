"""`mistral7b serve`: the model behind an OpenAI-compatible HTTP API, with continuous batching.

    mistral7b serve -m default --port 8000
    MISTRAL7B_API_KEY=sk-local mistral7b serve -m ./Mistral-7B-Instruct-v0.3 --host 0.0.0.0

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-local")

The socket is bound first (`--port 0` picks a free port; the address is logged), then the
model loads in the background: `/health` answers 503 until it is ready. SIGTERM (or Ctrl-C)
stops admitting requests, gives running ones --shutdown-grace seconds, ends the rest with an
error event, and exits 0 (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mistral7b import servers
from mistral7b.cli import common
from mistral7b.errors import InputError

API_KEY_ENV = "MISTRAL7B_API_KEY"
EXIT_LOAD_FAILED = 1


def add_parser(subparsers: Any) -> None:
    from mistral7b.server.settings import ServerSettings

    d = ServerSettings()
    p = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve the model over the OpenAI API (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /v1/moderations) with continuous "
                    "batching; also /health, /metrics (Prometheus), /tokenize and /detokenize.")
    common.add_model_args(p)
    common.add_tp_arg(p)
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only)")
    g.add_argument("--port", type=int, default=8000,
                   help="port to bind; 0 picks a free one (default: %(default)s)")
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; "
                        "/health stays open)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; default: CORS off)")
    g.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients use (default: the model's file or folder name, "
                        "'default' for the embedded model)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-concurrency", type=int, default=d.max_concurrency, metavar="N",
                   help="sequences decoded together, one KV cache row each "
                        "(default: %(default)s)")
    g.add_argument("--max-queue", type=int, default=d.max_queue, metavar="N",
                   help="requests waiting for a row; beyond that: 503 + Retry-After "
                        "(default: %(default)s)")
    g.add_argument("--max-model-len", type=int, metavar="N",
                   help="context per sequence, prompt + completion (default: the model's)")
    g.add_argument("--max-n", type=int, default=d.max_n, metavar="N",
                   help="most choices (n) per request (default: %(default)s)")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, metavar="B",
                   help="largest request body; beyond: 413 (default: %(default)s)")
    g.add_argument("--timeout", type=float, default=d.timeout, metavar="S",
                   help="seconds a request may take, queueing included; 0 = no limit "
                        "(default: %(default)s)")
    g.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk, metavar="N",
                   help="prompt tokens fed per step, so running streams keep flowing while "
                        "a long prompt loads (default: %(default)s)")
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="compute every prompt in full (by default the KV of earlier requests' "
                        "prompts and answers is kept within --kv-cache-memory and reused by "
                        "requests that start with the same tokens)")
    g.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace, metavar="S",
                   help="on SIGTERM, seconds running requests get to finish "
                        "(default: %(default)s)")
    g.add_argument("--sse-keepalive", type=float, default=d.sse_keepalive, metavar="S",
                   help="a stream that sent nothing for S seconds (a long pre-fill) gets a "
                        "': keep-alive' comment line; 0 = never (default: %(default)s)")
    g = p.add_argument_group("adapters and guardrails")
    g.add_argument("--lora", dest="serve_lora", action="append", default=[],
                   metavar="[NAME=]PATH[:SCALE]",
                   help="NAME=PATH: serve a LoRA adapter (PEFT or Mistral file) as model NAME, "
                        "chosen per request by `model` (listed in /v1/models; requests for "
                        "different adapters and the base share one batch); PATH alone: apply "
                        "it to every request. Repeatable")
    g.add_argument("--moderate", choices=("input", "output", "both"),
                   help="screen requests (input), answers (output) or both with "
                        "self-reflection moderation; flagged ones get a 400 "
                        "(code content_policy_violation)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level on stderr (default: %(default)s)")
    p.add_argument("--no-access-log", action="store_true", help="do not log each request")
    p.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> Any:
    from mistral7b.server.settings import ServerSettings

    name = args.served_model_name or model_name(args.model)
    try:
        return ServerSettings(
            model_name=name, api_key=args.api_key or None,
            max_concurrency=args.max_concurrency, max_queue=args.max_queue,
            max_model_len=args.max_model_len, max_n=args.max_n,
            max_body_bytes=args.max_body_bytes, timeout=args.timeout or None,
            cors_origins=tuple(args.cors_origin), prefill_chunk=args.prefill_chunk,
            prefix_cache=not args.no_prefix_cache,
            shutdown_grace=args.shutdown_grace, sse_keepalive=args.sse_keepalive or None,
            moderate=args.moderate)
    except ValueError as exc:
        raise InputError(f"{exc} (see 'mistral7b serve --help')") from None


def split_lora_args(args: argparse.Namespace) -> dict[str, tuple[Path, float]]:
    """--lora values: PATH[:SCALE] ones go to args.lora_specs (applied to the model at load);
    NAME=PATH[:SCALE] ones are returned, to be served by name. A NAME has no '/'."""
    from mistral7b.lora.multi import parse_named_spec

    served: dict[str, tuple[Path, float]] = {}
    args.lora_specs = []
    for text in args.serve_lora:
        name, sep, _ = text.partition("=")
        if sep and "/" not in name:
            name, spec = parse_named_spec(text)
            if name in served:
                raise InputError(f"--lora {name}=...: the name is given twice")
            served[name] = spec
        else:
            args.lora_specs.append(text)
    return served


def model_name(model: str) -> str:
    return "default" if model == "default" else Path(model).expanduser().name


def bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET                          # a host name
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from mistral7b.distributed.runtime import is_worker_rank

    if is_worker_rank():   # a tensor-parallel worker rank: no HTTP, serve rank 0 until it stops
        common.load_model(args, quiet=True)
        return 0
    try:
        from mistral7b.server import create_app
        from mistral7b.server.runner import serve
    except ImportError as exc:
        raise InputError(f"the server needs the [server] extra ({exc.name} is missing): "
                         "pip install 'mistral7b[server]'") from None

    settings = settings_from_args(args)
    served = split_lora_args(args)
    if settings.model_name in served:
        raise InputError(f"--lora {settings.model_name}=...: that name is the base model's")
    if not is_loopback(args.host) and not settings.api_key:
        common.log(f"warning: listening on {args.host} without an API key: anyone who can "
                   f"reach this port can use the model (set --api-key or ${API_KEY_ENV})")
    from mistral7b.store import resolve

    resolve(args.model)       # a model that is not here is one line now, before binding
    if args.threads is not None and args.threads < 1:
        raise InputError(f"-t/--threads must be >= 1, got {args.threads}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    failed: list[BaseException] = []
    registered: list[int] = []
    shown = f"[{host}]" if ":" in host else host

    def load() -> Any:
        llm = common.load_model(args, quiet=True, bars=True)
        for name, (path, scale) in served.items():
            llm.add_adapter(name, path, scale)
        common.log(f"model {settings.model_name} loaded in {llm.load_seconds:.1f} s: {llm!r}")
        return llm

    def ready(llm: Any) -> None:
        # `mistral7b generate` / `chat` / `ps` find this server from now on (servers.py)
        registered.append(register_server(args, llm, settings, f"http://{shown}:{port}"))

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        app.state.server.stop_server()

    app = create_app(load, settings, on_load_error=on_load_error, on_ready=ready)
    common.log(f"listening on http://{shown}:{port} (model {args.model} loading; "
               "/health answers 200 when ready)")
    try:
        serve(app, sock, log_level=args.log_level, access_log=not args.no_access_log)
    finally:
        for pid in registered:
            servers.unregister(pid)
        sock.close()
    if failed:
        common.log(f"error: the model failed to load: {common_line(failed[0])}")
        return common.EXIT_USAGE if isinstance(failed[0], InputError) else EXIT_LOAD_FAILED
    return 0


def register_server(args: argparse.Namespace, llm: Any, settings: Any, url: str) -> int:
    """Write this server's entry in $MISTRAL7B_HOME/servers/ (servers.py); its pid."""
    from mistral7b import __version__
    from mistral7b.cli.remote import lora_key
    from mistral7b.store import resolve

    # A wildcard address is reached through loopback by the clients on this machine.
    url = url.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")
    entry = servers.ServerEntry(
        url=url, pid=os.getpid(), started=time.time(), model=args.model,
        path=str(resolve(args.model).path.resolve()), quant_flag=args.quant,
        quant=llm.quant or "none", dtype_flag=args.dtype,
        dtype=str(llm.engine.dtype).removeprefix("torch."), device=str(llm.engine.device),
        speculate=llm.speculate, lora=sorted(lora_key(s) for s in args.lora_specs),
        adapters=sorted(llm.adapters), max_model_len=settings.max_model_len
        or llm.config.max_seq_len, trained_len=llm.config.max_seq_len,
        served_model_name=settings.model_name, api_key_required=bool(settings.api_key),
        version=__version__)
    servers.register(entry)
    return entry.pid


def common_line(exc: BaseException) -> str:
    from mistral7b.cli.main import one_line

    return one_line(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mistral7b.cli.serve ...`: this command alone, with the CLI's error handling."""
    from mistral7b.cli.main import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
