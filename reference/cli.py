"""`python -m reference ...`: generate, chat, bench and serve from the command line.

User errors (a bad flag value, a missing model) print one line on stderr and exit with status 2; no traceback.
Parsing the flags and checking the engine's options import no torch, so --help and flag errors answer at once.
"""

from __future__ import annotations

import argparse
import sys

from .engine_config import EngineConfig
from .flags import add_engine_flags, add_model_flags, add_sampling_flags, engine_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reference", description="The nano-vLLM Labs reference engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a reply to one prompt, streamed")
    gen.add_argument("prompt")
    gen.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text (completion)")
    add_model_flags(gen)
    add_sampling_flags(gen, max_tokens=128)
    add_engine_flags(gen, exclude=("seed",))  # --seed is the sampling seed here
    chat = sub.add_parser("chat", help="interactive chat that keeps the conversation's history")
    chat.add_argument("--system", default=None, help="a system prompt")
    add_model_flags(chat)
    add_sampling_flags(chat, max_tokens=512)
    add_engine_flags(chat, exclude=("seed",))
    bench = sub.add_parser("bench", help="offline throughput and latency of the engine on a synthetic workload")
    from .bench import add_bench_arguments

    add_bench_arguments(bench)
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming, /metrics)")
    from .server.cli import add_serve_arguments

    add_serve_arguments(serve)
    return parser


class Session:
    """A loaded engine, and streaming generation of one prompt's reply."""

    def __init__(self, args: argparse.Namespace) -> None:
        import transformers

        from .llm import LLM
        from .sampling import SamplingParams

        transformers.logging.set_verbosity_error()
        self.params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
            seed=args.seed,
        )
        # One conversation at a time: one sequence's worth of KV memory is enough (unless the flags say otherwise).
        self.llm = LLM(args.model, **{"max_num_seqs": 1, **engine_options(args, exclude=("seed",))})
        self.tokenizer = self.llm.tokenizer
        if not self.tokenizer.available:
            raise ValueError(f"{args.model} has no tokenizer files; the CLI needs a tokenizer to read text")

    def stream_reply(self, prompt_ids: list[int]) -> str:
        """Print the reply as it is generated; return its full text."""
        text = ""
        for out in self.llm.stream(prompt_ids, self.params):
            new_text = out.outputs[0].text
            print(new_text[len(text):], end="", flush=True)
            text = new_text
        print(flush=True)
        return text


def run_generate(args: argparse.Namespace) -> None:
    session = Session(args)
    if args.no_chat_template:
        prompt_ids = session.tokenizer.encode(args.prompt)
    else:
        prompt_ids = session.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    session.stream_reply(prompt_ids)


def run_chat(args: argparse.Namespace) -> None:
    session = Session(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("Chatting with", args.model, "- type /reset to forget the conversation, /exit or Ctrl-D to leave.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = session.stream_reply(session.tokenizer.apply_chat_template(history))
        history.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Bad engine flag values are refused here, before torch loads (seconds) and the model does.
        EngineConfig.from_kwargs(str(args.model or "smollm2"), **engine_options(args, exclude=("seed",)))
        if args.command == "bench":
            from .bench import run_bench

            run_bench(args)
        elif args.command == "serve":
            from .server.cli import run_serve

            run_serve(args)
        else:
            {"generate": run_generate, "chat": run_chat}[args.command](args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
