"""`serve`: the flags of the OpenAI-compatible server and `run_serve`, which loads the engine and runs uvicorn.

    python -m reference.server --model smollm2 --port 8000 [--api-key KEY] [--max-queue N] [--request-timeout S]

Shutdown: on SIGTERM or SIGINT uvicorn stops accepting connections; we first tell the engine thread to abort
every request in flight (a non-streamed one gets a 503, a streamed one an error event and [DONE]), so the open
connections close at once, then uvicorn runs the app's shutdown, which joins the engine thread, and the process
exits with status 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import argparse
import logging
import os

from ..flags import add_engine_flags, add_model_flags, engine_options
from . import MAX_REQUEST_BYTES

SHUTDOWN_TIMEOUT_S = 10  # after this, uvicorn cancels whatever is still running


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m reference serve` (and `python -m reference.server`)."""
    add_model_flags(parser)
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    net.add_argument("--served-model-name", default=None, help="the name clients give as 'model' (default: --model)")
    net.add_argument("--api-key", default=os.environ.get("NANO_VLLM_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on /v1 routes (default: $NANO_VLLM_API_KEY, or none)")
    net.add_argument("--max-queue", type=int, default=None,
                     help="requests that may wait beyond --max-num-seqs; more get HTTP 429 (default: no limit)")
    net.add_argument("--request-timeout", type=float, default=None,
                     help="seconds a request may take from arrival to its last token, then it is aborted "
                          "(default: no limit)")
    net.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                     help=f"larger request bodies get HTTP 413 before they are read (default {MAX_REQUEST_BYTES})")
    net.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    net.add_argument("--access-log", action="store_true", help="log every HTTP request")
    add_engine_flags(parser)


def run_serve(args: argparse.Namespace) -> None:
    """Load the engine and serve until SIGTERM / SIGINT. Bad flags raise ValueError before anything loads."""
    import transformers
    import uvicorn

    from ..engine import LLMEngine
    from .app import ServerSettings, create_app
    from .graceful import GracefulServer

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue is not None and args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be a positive number of seconds, got {args.request_timeout}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    transformers.logging.set_verbosity_error()

    # A server runs for days: no record of every step, unless --log-steps asks for one.
    engine = LLMEngine(args.model, **{"log_steps": False, **engine_options(args)})
    settings = ServerSettings(model_name=args.served_model_name or args.model, api_key=args.api_key or None,
                              max_queue=args.max_queue, request_timeout=args.request_timeout,
                              max_request_bytes=args.max_request_bytes)
    app = create_app(engine, settings)
    config = engine.config
    logging.getLogger("reference.server").info(
        "serving %r (%s, max_num_seqs %d, max_model_len %d, %d KV blocks of %d) on http://%s:%d%s",
        settings.model_name, engine.device, config.max_num_seqs, config.max_model_len, engine.kv_manager.num_blocks,
        engine.kv_manager.block_size, args.host, args.port, ", API key required" if settings.api_key else "")
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               access_log=args.access_log, timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S)
    GracefulServer(uv_config, app.state.engine_thread).run()
    logging.getLogger("reference.server").info("shut down cleanly")
