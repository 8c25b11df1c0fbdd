"""`levante serve`: check the models, open the port, load in the background (/health 503 until warm).

Every model (-m, --models-config, --embedding-model, --rerank-model) is resolved and its architecture checked
before the port opens, so a wrong name or file fails at once, with one line and a non-zero exit.
The default model (the first) and the pinned ones then load and warm up in a thread while /health
answers 503; if that fails for any reason, the server stops and `levante serve` exits non-zero
with one line. The other models load on first use (serve/router.py).
"""
from __future__ import annotations

import asyncio
import functools
import gc
import logging
import sys
import threading
from pathlib import Path

import uvicorn

from levante.engine.args import EngineArgs
from levante.errors import InvalidRequest, LevanteError
from levante.multimodal.images import load_image
from levante.net import FetchPolicy
from levante.net.policy import listens_on_loopback
from levante.serve.app import ServerState, create_app
from levante.serve.http import guard, uvicorn_server
from levante.serve.limits import RequestLimits
from levante.serve.metrics import cpu_kernels
from levante.serve.model_specs import ModelSpec, specs_from_cli
from levante.serve.router import ModelRouter, Route
from levante.serve.ranking import Ranker
from levante.serve.sites import SitePolicy
from levante.serve.webui import DOCS_PAGES, OPEN_PAGES, WebUI
from levante.serve.web_search import configure_web_search

logger = logging.getLogger("levante")


def build_server(state: ServerState, host: str, port: int, api_key: str | None = None,
                 log_level: str = "info", open_metrics: bool = False, sites: SitePolicy | None = None) -> uvicorn.Server:
    """The OpenAI API for `state` on host:port (and the web chat, with `state.webui`), behind the site,
    key, body and connection guards (serve/http.py); `sites` default: the names of `host` only."""
    return uvicorn_server(guarded_app(state, host, api_key, open_metrics, sites), host, port, state.limits, log_level)


def guarded_app(state: ServerState, host: str, api_key: str | None = None, open_metrics: bool = False,
                sites: SitePolicy | None = None):
    """The ASGI app of `state` behind the site, key and body guards: what uvicorn serves here, and
    what a Ray Serve replica serves (serve/ray_serve.py)."""
    open_pages = OPEN_PAGES if state.webui is not None else DOCS_PAGES
    return guard(create_app(state), state.limits, api_key, sites or SitePolicy(host), open_metrics, open_pages)


def addresses(host: str, port: int, webui: bool) -> str:
    """Where to point a browser and a client, for the log line that says the server is ready."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    base = f"http://{shown}:{port}"
    return (f"web chat at {base}/, " if webui else "") + f"API at {base}/v1, docs at {base}/docs"


def check_models(specs: list[ModelSpec]) -> None:
    """Resolve every model and check its architecture, without reading weights: a ModelLoadError before
    the port opens (a Hub model is downloaded here). Each spec learns its task (what it serves)."""
    from levante.loader.auto import model_task, open_model

    for spec in specs:
        open_model(spec.args.model_name, spec.args.progress)
        found = model_task(spec.args.model_name)
        if spec.task == "embed" and found != "embed":
            raise InvalidRequest(f"--embedding-model: '{spec.name}' is not a sentence-embedding model "
                                 "(a folder with modules.json or config_sentence_transformers.json, or an alias)")
        if spec.task == "score" and found not in ("score", "generate"):
            raise InvalidRequest(f"--rerank-model: '{spec.name}' is not a cross-encoder or a decoder LLM" +
                                 (" (an embedding model reranks by cosine similarity: serve it with "
                                  "--embedding-model)" if found == "embed" else ""))
        spec.task = spec.args.task or found


def _mcp_manager(args, policy: FetchPolicy):
    """The MCP tool manager for `--mcp-config` (or MCP_CONFIG_PATH), not yet started; None without one."""
    path = getattr(args, "mcp_config", None)
    if getattr(args, "mcp_max_rounds", 0) < 0:
        raise InvalidRequest("--mcp-max-rounds: must be 0 or more")
    if getattr(args, "mcp_max_tools", 0) < 0:
        raise InvalidRequest("--mcp-max-tools: must be 0 (no cap) or more")
    if not path:
        return None
    from levante.mcp import McpConfig, McpToolManager

    return McpToolManager(McpConfig.load(path), policy=policy.without_domain_list())


def _start_mcp(state: ServerState, manager) -> None:
    """Start the MCP servers (a failing one is reported, the others serve) and offer their tools."""
    asyncio.run(manager.start())
    for server_id, reason in manager.failures.items():
        logger.warning("levante: MCP server '%s' is not available: %s", server_id, reason)
    servers = {tool.server_id for tool in manager.tools}
    logger.warning("levante: MCP: %d tools from %d servers%s", len(manager.tools), len(servers),
                   "" if manager.config.auto_register_tools else " (auto_register_tools is off: none offered)")
    state.mcp = manager


def ranking_model(router: ModelRouter):
    """The served embedding model that ranks search passages and MCP tools (serve/ranking.py): a pinned
    one (--embedding-model), which stays loaded; None: the packaged fallback."""
    return next((m.llm for m in router.models.values() if m.spec.pinned and m.spec.embedding), None)


def _prepare_tool_selection(state: ServerState, served) -> None:
    """Say how MCP tools will be offered to chat model `served`, and embed them now if they will be ranked
    (not in a request)."""
    from levante.serve.tool_selection import selector_for

    selector = selector_for(state, Route(served.name, served))
    if selector.selects:
        logger.warning("levante: MCP: more tools than fit the budget (%d, or %d tokens): each request is offered "
                       "the most relevant", state.mcp_max_tools, selector.max_tool_tokens)
        selector.prepare()


def _serve_mcp(state: ServerState, args, sites: SitePolicy):
    """`--mcp-port`: levante's own MCP server, in a thread next to the OpenAI one; None without the flag."""
    if not getattr(args, "mcp_port", None):
        return None
    from levante.mcp.server import build_mcp_http_server

    mcp_server = build_mcp_http_server(state, args.host, args.mcp_port, args.api_key, sites=sites)
    threading.Thread(target=mcp_server.run, name="levante-mcp-server", daemon=True).start()
    logger.warning("levante: MCP server at http://%s:%d/mcp", args.host, args.mcp_port)
    return mcp_server


def local_media_policy(host: str, allowed: list[str] | None) -> bool | list[Path]:
    """Which local files an image_url may name: the `--allowed-local-media-path` folders; without any,
    every file when serving on loopback (the user's own machine), none on a public address."""
    if allowed:
        folders = [Path(folder).expanduser() for folder in allowed]
        for folder in folders:
            if not folder.is_dir():
                raise InvalidRequest(f"--allowed-local-media-path: '{folder}' is not a folder")
        return folders
    return listens_on_loopback(host)


def fetch_policy(args) -> FetchPolicy:
    """What URLs in requests (images, search result pages) and MCP server URLs may reach."""
    return FetchPolicy.for_server(args.host, getattr(args, "allowed_media_domains", None),
                                  getattr(args, "allow_private_network", False))


def site_policy(args) -> SitePolicy:
    """The names and pages both listeners answer (--host, --allowed-hosts, --allowed-origins)."""
    try:
        return SitePolicy(args.host, tuple(getattr(args, "allowed_hosts", None) or ()),
                          tuple(getattr(args, "allowed_origins", None) or ()))
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


def server_state(args, progress: bool = False) -> tuple[ServerState, list[ModelSpec], FetchPolicy, object]:
    """What `levante serve ARGS` serves, checked and not yet loaded: the state, the model specs, the fetch
    policy and the MCP manager (not started). A bad flag, config or model raises here."""
    if getattr(args, "data_parallel_size", 1) < 1:
        raise InvalidRequest("--data-parallel-size: must be 1 or more")
    engine_args = EngineArgs.from_cli_args(args, model=None, warmup=True, progress=progress)
    specs = specs_from_cli(args, engine_args)
    policy = fetch_policy(args)
    manager = _mcp_manager(args, policy)  # a bad config stops here, before anything starts
    check_models(specs)  # so does a model that cannot be found or is not supported
    state = ServerState(limits=RequestLimits.from_cli_args(args), router=ModelRouter.from_cli_args(args, specs))
    state.load_image = functools.partial(
        load_image, local_paths=local_media_policy(args.host, getattr(args, "allowed_local_media_path", None)),
        fetch_policy=policy)
    state.mcp_max_rounds = getattr(args, "mcp_max_rounds", state.mcp_max_rounds)
    state.mcp_max_tools = getattr(args, "mcp_max_tools", state.mcp_max_tools)
    if not getattr(args, "no_webui", False):
        state.webui = WebUI()
    return state, specs, policy, manager


def load_models(state: ServerState, specs: list[ModelSpec], args, policy: FetchPolicy) -> None:
    """Load the default model and the pinned ones (the others load on first use), and what ranks with them."""
    for spec in specs:
        if spec is specs[0] or spec.pinned:
            state.router.start_loading(spec.name).result()
    state.ranker = Ranker(ranking_model(state.router))
    configure_web_search(state, args.search_url, policy)


def serve(args) -> int:
    sites = site_policy(args)
    state, specs, policy, manager = server_state(args, progress=sys.stderr.isatty())
    server = build_server(state, args.host, args.port, args.api_key, open_metrics=getattr(args, "open_metrics", False),
                          sites=sites)
    mcp_start = threading.Thread(target=_start_mcp, args=(state, manager), name="levante-mcp-start", daemon=True)
    if manager is not None:
        mcp_start.start()

    def load():
        """The default model and the pinned ones load now (the others on first use); /health is 503 until then."""
        try:
            load_models(state, specs, args, policy)
        except Exception as e:  # noqa: BLE001 - any failure stops the server with one line
            state.load_failure = str(e) if isinstance(e, LevanteError) else f"internal error: {type(e).__name__}: {e}"
            server.should_exit = True
            return
        if manager is not None:
            mcp_start.join()  # ready means the MCP tools are offered too
        state.ready = True
        gc.enable()  # off since `levante serve` began (cli.cmd_serve); what start-up made is frozen
        default = state.router.default
        if state.mcp is not None and default.spec.task == "generate":
            _prepare_tool_selection(state, default)
        logger.warning("levante: %s ready (load %.1fs, CPU kernels %s): %s", default.name,
                       default.load_seconds or 0.0, cpu_kernels(), addresses(args.host, args.port, state.webui is not None))

    gc.freeze()  # modules, classes, the web app: never garbage, and no collection walks them again
    threading.Thread(target=load, name="levante-load", daemon=True).start()
    mcp_server = _serve_mcp(state, args, sites)
    server.run()
    if mcp_server is not None:
        mcp_server.should_exit = True
    if manager is not None:
        manager.close()
    state.close()
    if state.load_failure:
        print(f"levante: error: {state.load_failure}", file=sys.stderr)
        return 1
    return 0
