"""The routes that change what a server serves (serve/http.py's ADMIN_PATHS): they name files on
the server's disk or free its memory, so they answer only on a server started with `--api-key`.

- `POST /v1/load_lora_adapter {"lora_name", "lora_path", "model"?}` and
  `POST /v1/unload_lora_adapter {"lora_name"}`: vLLM's routes and bodies; `model` (levante's)
  names the base model, the default model without it. An adapter's files are read and checked in a
  worker thread (loader/lora.py), then attached on the engine's thread between two steps; adapters
  are kept in the model's spec, so that a reload brings them back.
- `POST /models/load {"model"}` and `POST /models/unload {"model"}`: llama.cpp's router routes.
- `POST /sleep?level=1|2[&model=NAME]` and `POST /wake_up[?model=NAME]`: vLLM's routes
  (serve/router.py's sleep and wake); `GET /is_sleeping` says which models sleep.
"""
from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import Field

from levante.errors import InvalidRequest, ModelNotFound
from levante.serve.protocol import Strict


class LoadLoraAdapterRequest(Strict):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)
    model: str | None = None  # the base model (levante's); default: the default model


class UnloadLoraAdapterRequest(Strict):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM's; the name is what counts here


class ModelRequest(Strict):
    model: str = Field(min_length=1)


def register_admin(app: FastAPI, state) -> None:
    router = state.router

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest):
        name = body.lora_name
        if name in router.models:
            raise InvalidRequest(f"'{name}' is a model's name: pick another for the adapter")
        if name in router.names():
            raise InvalidRequest(f"LoRA adapter '{name}' is already loaded")
        async with state.pipeline.routed(body.model) as route:
            if route.lora is not None:
                raise InvalidRequest(f"model: '{body.model}' is an adapter; name its base model")
            engine = route.llm.engine
            engine.lora.check_new(name)
            # files are read and checked off the engine's thread; only attaching runs on it, between steps
            adapter = await asyncio.to_thread(engine.lora.read, body.lora_path)
            loaded = await asyncio.wrap_future(route.loop.call(lambda: engine.load_lora(name, adapter)))
            route.model.spec.args.lora = {**route.model.spec.adapters, name: str(loaded.path)}
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
        name = body.lora_name
        served = next((m for m in router.models.values() if name in m.spec.adapters), None)
        if served is None:
            raise ModelNotFound(f"no LoRA adapter named '{name}' is loaded")
        if router.hold_if_loaded(served):
            try:
                engine = served.llm.engine
                await asyncio.wrap_future(served.loop.call(lambda: engine.unload_lora(name)))
            finally:
                router.release(served)
        served.spec.args.lora = {n: p for n, p in served.spec.adapters.items() if n != name}
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/models/load")
    async def load_model(body: ModelRequest):
        await router.load(body.model)
        return {"success": True, "model": body.model, "status": router.models[body.model].status}

    @app.post("/models/unload")
    async def unload_model(body: ModelRequest):
        unloaded = await router.unload(body.model)
        return {"success": True, "model": body.model, "status": "unloaded", "was_loaded": unloaded}

    @app.post("/sleep", description=SLEEP_DOC)
    async def sleep(level: int = 1, model: str | None = None):
        """vLLM's route: `level` 1 or 2, `model` one model (default: every loaded one)."""
        return {"success": True, "level": level, "sleeping": await router.sleep(model, level)}

    @app.post("/wake_up", description=WAKE_DOC)
    async def wake_up(model: str | None = None):
        return {"success": True, "woken": await router.wake(model)}

    @app.get("/is_sleeping", description=IS_SLEEPING_DOC)
    async def is_sleeping(model: str | None = None):
        if model is not None and model not in router.models:
            raise ModelNotFound(f"model '{model}' is not served here")
        models = [router.models[model]] if model is not None else list(router.models.values())
        return {"is_sleeping": any(m.status == "sleeping" for m in models),
                "models": {m.name: m.status == "sleeping" for m in models}}


SLEEP_DOC = """Put models to sleep (admin: needs a server started with --api-key). Level 1 gives the weights
and KV cache back to the system and keeps what a wake needs (tokenizer, template, grammar tables);
level 2 unloads the model whole. The next request for a sleeping model wakes it (its wake time is
`levante_model_wake_seconds` in /metrics); `--sleep-after SECONDS` does this for idle models.

```
curl -X POST "http://127.0.0.1:8000/sleep?level=1" -H "Authorization: Bearer $KEY"
curl -X POST http://127.0.0.1:8000/wake_up -H "Authorization: Bearer $KEY"
```
```python
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8000", api_key="KEY")   # the admin routes are not under /v1
client.post("/sleep", cast_to=object, options={"params": {"level": 1}})
client.post("/wake_up", cast_to=object)
```
"""
WAKE_DOC = """Wake sleeping models now (admin), as their next request would; `model` names one.

```
curl -X POST "http://127.0.0.1:8000/wake_up?model=qwen2.5-coder:0.5b" -H "Authorization: Bearer $KEY"
```
```python
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8000", api_key="KEY")
print(client.post("/wake_up", cast_to=object))   # {"success": true, "woken": [...]}
```
"""
IS_SLEEPING_DOC = """Whether models sleep (admin): `is_sleeping` (any of them) and each model's state.

```
curl http://127.0.0.1:8000/is_sleeping -H "Authorization: Bearer $KEY"
```
```python
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8000", api_key="KEY")
print(client.get("/is_sleeping", cast_to=object))   # {"is_sleeping": false, "models": {...}}
```
"""
