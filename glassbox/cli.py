"""Command line: `glassbox generate PROMPT [--max-tokens N] [--model PATH] [--dtype D] [--json] [--chat]`."""

from __future__ import annotations

import argparse
import json
import sys

from glassbox.errors import GlassboxError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glassbox", description="LLM inference server with its engine opened up")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="greedy continuation of a prompt (prints the new text only)")
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default 64)")
    generate.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: SmolLM2-135M)")
    generate.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    generate.add_argument("--device", default="cpu")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    generate.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]}')
    return parser


def run_generate(args: argparse.Namespace) -> None:
    from glassbox.generate import greedy_generate
    from glassbox.models.loader import load_model

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = loaded.tokenizer
    if args.chat:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    stop_ids = set(loaded.config.eos_token_ids) | {tokenizer.eos_token_id} - {None}
    token_ids = greedy_generate(loaded, prompt_ids, args.max_tokens, stop_ids)
    text = tokenizer.decode(token_ids)
    if args.json:
        print(json.dumps({"text": text, "token_ids": token_ids}))
    else:
        print(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            run_generate(args)
    except (GlassboxError, ValueError) as error:
        print(f"glassbox: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
