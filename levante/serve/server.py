"""`levante serve`: load the model in the background, answer /health 503 until warm."""
from __future__ import annotations

import logging
import sys
import threading

import uvicorn
from fastapi import Request
from fastapi.responses import JSONResponse

from levante.serve.app import ServerState, create_app
from levante.serve.protocol import error_body

logger = logging.getLogger("levante")


def serve(args) -> int:
    state = ServerState(args.served_model_name or args.model)
    app = create_app(state)
    if args.api_key:
        @app.middleware("http")
        async def require_key(request: Request, call_next):
            if request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {args.api_key}":
                return JSONResponse(error_body("invalid or missing API key", "authentication_error", code=401), 401)
            return await call_next(request)

    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
    failure: list[str] = []

    def load():
        from levante.cli import _load
        from levante.errors import LevanteError

        try:
            llm = _load(args, warmup=True)
        except LevanteError as e:
            failure.append(str(e))
            server.should_exit = True
            return
        state.attach(llm)
        logger.warning("levante: %s ready (load %.1fs)", state.model_name, llm.engine.load_seconds)

    threading.Thread(target=load, name="levante-load", daemon=True).start()
    server.run()
    if failure:
        print(f"levante: error: {failure[0]}", file=sys.stderr)
        return 1
    return 0
