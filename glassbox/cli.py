"""Command line:

    glassbox generate PROMPT [--max-tokens N] [--model PATH] [--dtype D] [--json] [--chat]
    glassbox serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--plugin FILE] ...
    glassbox algorithms [--plugin FILE]    the scheduling policies and sparsity methods, by name
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from glassbox.algorithms import ALGORITHMS, UnknownNameError
from glassbox.config import ACTIVATIONS, KV_CACHE_DTYPES
from glassbox.engine.policies import get_policy  # also registers the built-in policies, for --help
from glassbox.errors import GlassboxError

# `generate` runs one prompt: a small KV pool starts faster than serve's 1 GiB (its pages are zeroed at
# start) and still holds ~2,800 tokens of SmolLM2-135M in float32.
GENERATE_KV_CACHE_GIB = 0.125

if TYPE_CHECKING:
    from glassbox.research.plugins import PluginManager


TP_HELP = (
    "ranks that split the model (default 1): this process is rank 0, N - 1 worker processes hold the other shards "
    "(gloo on the CPU, NCCL on CUDA; float weights); under torchrun, the ranks torchrun started"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glassbox", description="LLM inference server with its engine opened up")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="greedy continuation of a prompt (prints the new text only)")
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default 64)")
    generate.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: SmolLM2-135M)")
    generate.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16")
    generate.add_argument("--device", default="cpu")
    generate.add_argument(
        "--kv-cache-memory", type=float, default=GENERATE_KV_CACHE_GIB,
        help=f"GiB for the KV cache: prompt + max tokens must fit (default {GENERATE_KV_CACHE_GIB})",
    )
    generate.add_argument("--tensor-parallel-size", type=int, default=1, help=TP_HELP)
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    generate.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]}')

    serve = commands.add_parser("serve", help="start the HTTP server (the design's API + OpenAI-compatible /v1)")
    serve.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: SmolLM2-135M)")
    serve.add_argument("--model-name", default=None, help="the name clients use in /v1 requests")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16")
    serve.add_argument("--device", default="cpu")
    serve.add_argument(
        "--quantization", choices=["auto", "none", "int4", "int8"], default="auto",
        help="CPU weights: auto = the checkpoint's own block format (Q4_1 or Q8_0) on the native kernels; "
        "none = float32",
    )  # fmt: skip
    serve.add_argument(
        "--activations", choices=ACTIVATIONS, default="auto",
        help="what quantized CPU weights multiply: auto (int12 where the native kernels run), float32 "
        "activations (the model's numerics), int8 blocks (llama.cpp's arithmetic), int16 blocks as two int8 "
        "halves (integer products, float32's greedy text), or int12 (the same at 4,079 levels, faster on AMX)",
    )  # fmt: skip
    serve.add_argument(
        "--kv-cache-memory", type=float, default=None,
        help="GiB for the KV-cache pool (default: 1 on the CPU; on CUDA, 90%% of the device's memory less the rest)",
    )
    serve.add_argument(
        "--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
        help="auto: bfloat16 beside the CPU's int12/int8 activations (the default), else the model's dtype; "
        "float32; bfloat16: half a float32 model's bytes per cached token; fp8: float8_e4m3fn",
    )
    serve.add_argument("--max-num-seqs", type=int, default=256)
    serve.add_argument(
        "--batch-invariant", action="store_true",
        help="a request's logits the same bits whatever else is in the batch (CUDA: slower Triton kernels)",
    )  # fmt: skip
    serve.add_argument("--tensor-parallel-size", type=int, default=1, help=TP_HELP)
    serve.add_argument(
        "--scheduling-policy", default="fcfs",
        help=f"{', '.join(ALGORITHMS.scheduling_policies.names())}, or a policy of the --plugin file (default fcfs)",
    )
    serve.add_argument("--api-key", default=os.environ.get("GLASSBOX_API_KEY"), help="require 'Authorization: Bearer KEY'")
    serve.add_argument("--plugin", default=None, help="Python file registering algorithms; reloaded on change")
    serve.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--shutdown-timeout", type=float, default=30.0,
        help="seconds requests in flight get to finish after SIGTERM; the rest then end with an error (default 30)",
    )
    serve.add_argument(
        "--allowed-hosts", default=None,
        help="comma-separated Host names accepted ('*': any); default: the --host address (and its loopback names)",
    )
    serve.add_argument(
        "--cors-origin", action="append", default=[],
        help="a browser origin allowed to call the API (repeatable); none by default",
    )

    algorithms = commands.add_parser("algorithms", help="list the scheduling policies and sparsity methods by name")
    algorithms.add_argument("--plugin", default=None, help="also list what this plugin file registers")
    return parser


def run_generate(args: argparse.Namespace) -> None:
    """Greedy continuation through the offline API (glassbox.llm.LLM), the engine that serves."""
    from glassbox.llm import LLM
    from glassbox.sampling import SamplingParams

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.kv_cache_memory <= 0:
        raise ValueError(f"--kv-cache-memory must be positive, got {args.kv_cache_memory}")
    llm = LLM(
        args.model, dtype=args.dtype, device=args.device, kv_cache_memory=int(args.kv_cache_memory * 2**30),
        enforce_eager=True, compile=False,  # one short run: CUDA graphs and compilation would cost more than they save
        tensor_parallel_size=args.tensor_parallel_size,
    )
    with llm:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
        # The stop token (EOS) ends the output and is kept in token_ids; the text leaves it out.
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=args.max_tokens))[0]
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids}))
    else:
        print(out.text)


def _load_plugin(path_text: str) -> PluginManager:
    from glassbox.research.plugins import PluginManager

    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"--plugin {path_text}: no such file")
    plugins = PluginManager(path.resolve())
    plugins.load()  # a file that fails is reported and reloaded when it changes, as while serving
    return plugins


def _check_policy(name: str, plugins: PluginManager | None) -> None:
    """Fail before the model loads if --scheduling-policy names no policy, built in or the plugin's."""
    try:
        get_policy(name)
    except UnknownNameError as error:
        failed = plugins is not None and plugins.last_error is not None
        hint = f" (the plugin file did not load: {plugins.last_error})" if failed else ""
        raise ValueError(f"--scheduling-policy: {error}{hint}") from None


def run_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from glassbox.config import EngineConfig
    from glassbox.engine.async_engine import AsyncLLMEngine
    from glassbox.engine.llm_engine import LLMEngine
    from glassbox.models.loader import load_model
    from glassbox.server.app import create_app, uvicorn_shutdown_timeout
    from glassbox.server.settings import ServerSettings, allowed_hosts_for

    if args.kv_cache_memory is not None and args.kv_cache_memory <= 0:
        raise ValueError(f"--kv-cache-memory must be positive, got {args.kv_cache_memory}")
    # glassbox's own loggers at the chosen level (debug: every step's plan), beside uvicorn's.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("glassbox").setLevel(args.log_level.upper())
    # The plugin loads before the engine is built, so that --scheduling-policy may name one of its policies.
    plugins = _load_plugin(args.plugin) if args.plugin is not None else None
    _check_policy(args.scheduling_policy, plugins)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    engine_config = EngineConfig(
        kv_cache_memory=int(args.kv_cache_memory * 2**30) if args.kv_cache_memory is not None else None,
        kv_cache_dtype=args.kv_cache_dtype,
        max_num_seqs=args.max_num_seqs,
        scheduling_policy=args.scheduling_policy,
        quantization=args.quantization,
        activations=args.activations,
        tensor_parallel_size=args.tensor_parallel_size,
        batch_invariant=args.batch_invariant,
    )
    engine = AsyncLLMEngine(lambda: LLMEngine(loaded, engine_config)).start()
    # The engine thread holds the GIL for much of each step; hand it over more often (default 5 ms) so
    # the event loop sends tokens as they come instead of after the next step.
    sys.setswitchinterval(float(os.environ.get("GLASSBOX_SWITCH_INTERVAL", "0.001")))
    name = args.model_name or (Path(args.model).stem if args.model else "SmolLM2-135M-Instruct")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    hosts = [h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else None
    settings = ServerSettings(
        model_name=name,
        api_key=args.api_key,
        ready_message=f"glassbox: serving {name} on http://{args.host}:{args.port}",
        allowed_hosts=allowed_hosts_for(args.host, hosts),
        cors_origins=tuple(args.cors_origin),
        shutdown_timeout_s=args.shutdown_timeout,
        exit_on_engine_death=True,
    )
    uvicorn.run(
        create_app(engine, settings, plugins),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level in ("debug", "info"),
        timeout_graceful_shutdown=uvicorn_shutdown_timeout(settings),
    )


def run_algorithms(args: argparse.Namespace) -> None:
    """Every name `--scheduling-policy`, `algorithm` and `sparsity.method` accept, from the one registry."""
    from glassbox.layers import sparsity  # noqa: F401  (registers the built-in sparsity methods)

    if args.plugin is not None:
        plugins = _load_plugin(args.plugin)
        if plugins.last_error is not None:
            raise ValueError(f"--plugin {args.plugin}: {plugins.last_error}")
    tables = (("scheduling policies", ALGORITHMS.scheduling_policies), ("sparsity methods", ALGORITHMS.sparsity_methods))
    for title, table in tables:
        print(f"{title}:")
        for name, entry in table.entries().items():
            aliases = table.aliases_of(name)
            label = name + (f" ({', '.join(aliases)})" if aliases else "")
            origin = " [plugin]" if table.is_from_plugin(name) else ""
            print(f"  {label}: {entry.description}{origin}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            run_generate(args)
        elif args.command == "serve":
            run_serve(args)
        elif args.command == "algorithms":
            run_algorithms(args)
    except (GlassboxError, ValueError) as error:
        print(f"glassbox: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
