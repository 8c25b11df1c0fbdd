"""`levante serve`: load the model in the background, answer /health 503 until warm."""
from __future__ import annotations

import logging
import sys
import threading

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from levante.errors import InvalidRequest
from levante.serve.app import ServerState, create_app
from levante.serve.protocol import error_body
from levante.serve.web_search import configure_web_search

logger = logging.getLogger("levante")

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


def require_api_key(app: FastAPI, api_key: str) -> None:
    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path.startswith(PROTECTED_PREFIXES) and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse(error_body("invalid or missing API key", "authentication_error",
                                           code="invalid_api_key"), 401)
        return await call_next(request)


def build_server(state: ServerState, host: str, port: int, api_key: str | None = None,
                 log_level: str = "info") -> uvicorn.Server:
    app = create_app(state)
    if api_key:
        require_api_key(app, api_key)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                         timeout_graceful_shutdown=5))


def _load_embedding_model(args):
    """The `--embedding-model`, served next to the chat model, or None."""
    if not getattr(args, "embedding_model", None):
        return None
    from levante import LLM
    from levante.loader.auto import is_embedding_model

    if not is_embedding_model(args.embedding_model):
        raise InvalidRequest(f"--embedding-model: '{args.embedding_model}' is not a sentence-embedding model "
                             "(a folder with modules.json or config_sentence_transformers.json, or an alias)")
    return LLM(args.embedding_model, dtype=args.dtype, device=args.device, num_threads=args.threads)


def serve(args) -> int:
    state = ServerState(args.served_model_name or args.model)
    server = build_server(state, args.host, args.port, args.api_key)
    failure: list[str] = []

    def load():
        from levante.cli import _load
        from levante.errors import LevanteError

        try:
            llm = _load(args, warmup=True)
            embedding_llm = _load_embedding_model(args)
            configure_web_search(state, args.search_url, embedding_llm or (llm if llm.is_embedding_model else None))
        except LevanteError as e:
            failure.append(str(e))
            server.should_exit = True
            return
        if llm.engine is not None:
            llm.engine.grammars.ll_tokenizer  # build it now, not inside the first constrained request
        state.attach(llm, embedding_llm, args.embedding_model)
        seconds = llm.engine.load_seconds if llm.engine else llm.embedder.load_seconds
        logger.warning("levante: %s ready (load %.1fs)", state.model_name, seconds)

    threading.Thread(target=load, name="levante-load", daemon=True).start()
    server.run()
    if state.loop is not None:
        state.loop.stop()
    if failure:
        print(f"levante: error: {failure[0]}", file=sys.stderr)
        return 1
    return 0
