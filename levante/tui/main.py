"""Wiring for `levante chat`: the server to talk to (in-process levante, or --url), MCP tools, the store."""
from __future__ import annotations

import os
import sys
from urllib.parse import urlparse

from levante.errors import InvalidRequest, ServiceUnavailable


def load_tools(path: str | None):
    """An `McpToolHost` for the MCP config at `path`, or None without one."""
    if not path:
        return None
    try:
        from levante.mcp import McpConfig, McpConfigError, McpToolManager
    except ImportError as e:
        raise InvalidRequest(f"MCP tools are not available in this build ({e})") from None
    from levante.tui.tools import McpToolHost

    try:
        config = McpConfig.load(path)
    except McpConfigError:
        raise
    except OSError as e:
        raise InvalidRequest(f"MCP config {path}: {e}") from None
    return McpToolHost(McpToolManager(config))


def api_base(url: str) -> str:
    """`http://host:port` means its /v1; a URL with a path is taken as the API base itself."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InvalidRequest(f"--url must be an http(s) URL such as http://127.0.0.1:8000/v1, not '{url}'")
    return url.rstrip("/") + ("/v1" if parsed.path in ("", "/") else "")


def remote_model(base_url: str, api_key: str) -> str:
    """The first model the server lists (for --url without --model)."""
    import openai

    try:
        models = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30).models.list()
    except openai.APIStatusError as e:
        from levante.tui.session import api_error_message

        raise ServiceUnavailable(f"{base_url}/models: {api_error_message(e)}") from None
    except openai.APIError as e:
        raise ServiceUnavailable(f"cannot reach {base_url}: {e.__cause__ or e}") from None
    if not models.data:
        raise InvalidRequest(f"{base_url} lists no models; name one with --model")
    return models.data[0].id


def run_chat(args) -> int:
    import openai

    from levante.conversations import ConversationStore
    from levante.tui.app import ChatApp
    from levante.tui.session import ChatSession, Settings, image_part

    store = ConversationStore()
    # Conversations belong to the key given with --url, as a levante server's web chat stores them.
    store = store.as_owner(store.owner_of(args.api_key if args.url else None))
    if args.resume is not None:
        store.load(args.resume)  # a clear error now rather than inside the app
    tools = load_tools(args.mcp_config or os.environ.get("MCP_CONFIG_PATH"))
    server = None
    try:
        if args.url:
            base_url = api_base(args.url)
            api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or "none"
            model = args.model or remote_model(base_url, api_key)
            label = ""
        else:
            from levante import LLM
            from levante.engine.args import EngineArgs
            from levante.loader.sources import DEFAULT_MODEL
            from levante.tui.local import LocalServer

            args.model = args.model or DEFAULT_MODEL
            print(f"levante chat: loading {args.model}…", file=sys.stderr)
            llm = LLM.from_engine_args(EngineArgs.from_cli_args(args, warmup=False, progress=sys.stderr.isatty()))
            server = LocalServer(llm, args.model).start()
            base_url, api_key, model, label = server.base_url, server.api_key, args.model, " (local engine)"
        client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
        settings = Settings(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed, extra={"top_k": args.top_k} if args.top_k else {})
        session = ChatSession(client, model, tools, settings)
        session.set_system(args.system)
        app = ChatApp(session, store, conversation_id=args.resume, server_label=label, tools_host=tools)
        app.pending_images = [image_part(p) for p in getattr(args, "image", None) or []]  # `--image`, if offered
        app.run()
        return 0
    finally:
        if server is not None:
            server.stop()
        store.close()
