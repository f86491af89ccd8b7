"""Command line:

    glassbox generate PROMPT [--max-tokens N] [--model PATH] [--dtype D] [--json] [--chat]
    glassbox serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from glassbox.config import KV_CACHE_DTYPES
from glassbox.errors import GlassboxError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glassbox", description="LLM inference server with its engine opened up")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="greedy continuation of a prompt (prints the new text only)")
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default 64)")
    generate.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: SmolLM2-135M)")
    generate.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16")
    generate.add_argument("--device", default="cpu")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    generate.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]}')

    serve = commands.add_parser("serve", help="start the HTTP server (the design's API + OpenAI-compatible /v1)")
    serve.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: SmolLM2-135M)")
    serve.add_argument("--model-name", default=None, help="the name clients use in /v1 requests")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--quantization", choices=["int4", "int8"], default=None, help="weight quantization (CPU)")
    serve.add_argument(
        "--kv-cache-memory", type=float, default=None,
        help="GiB for the KV-cache pool (default: 1 on the CPU; on CUDA, 90%% of the device's memory less the rest)",
    )
    serve.add_argument(
        "--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
        help="auto: the model's dtype; bfloat16: half a float32 model's bytes per cached token; fp8: float8_e4m3fn",
    )
    serve.add_argument("--max-num-seqs", type=int, default=256)
    serve.add_argument("--scheduling-policy", default="fcfs", help="fcfs, priority or shortest_prompt_first")
    serve.add_argument("--api-key", default=os.environ.get("GLASSBOX_API_KEY"), help="require 'Authorization: Bearer KEY'")
    serve.add_argument("--plugin", default=None, help="Python file registering algorithms; reloaded on change")
    serve.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
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


def run_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from glassbox.config import EngineConfig
    from glassbox.engine.async_engine import AsyncLLMEngine
    from glassbox.engine.llm_engine import LLMEngine
    from glassbox.models.loader import load_model
    from glassbox.server.app import ServerSettings, create_app

    if args.plugin is not None and not Path(args.plugin).is_file():
        raise ValueError(f"--plugin {args.plugin}: no such file")
    if args.kv_cache_memory is not None and args.kv_cache_memory <= 0:
        raise ValueError(f"--kv-cache-memory must be positive, got {args.kv_cache_memory}")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    engine_config = EngineConfig(
        kv_cache_memory=int(args.kv_cache_memory * 2**30) if args.kv_cache_memory is not None else None,
        kv_cache_dtype=args.kv_cache_dtype,
        max_num_seqs=args.max_num_seqs,
        scheduling_policy=args.scheduling_policy,
        quantization=args.quantization,
    )
    engine = AsyncLLMEngine(lambda: LLMEngine(loaded, engine_config)).start()
    # The engine thread holds the GIL for much of each step; hand it over more often (default 5 ms) so
    # the event loop sends tokens as they come instead of after the next step.
    sys.setswitchinterval(float(os.environ.get("GLASSBOX_SWITCH_INTERVAL", "0.001")))
    name = args.model_name or (Path(args.model).stem if args.model else "SmolLM2-135M-Instruct")
    settings = ServerSettings(
        model_name=name,
        api_key=args.api_key,
        ready_message=f"glassbox: serving {name} on http://{args.host}:{args.port}",
        plugin=Path(args.plugin).resolve() if args.plugin else None,
    )
    uvicorn.run(
        create_app(engine, settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level in ("debug", "info"),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            run_generate(args)
        elif args.command == "serve":
            run_serve(args)
    except (GlassboxError, ValueError) as error:
        print(f"glassbox: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
