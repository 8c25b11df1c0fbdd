"""`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's routes and bodies).

They load files named by the caller into the server, so they answer only on a server started
with `--api-key` (serve/http.py's ADMIN_PATHS); adapters load on the engine's thread between two
steps. A loaded adapter is served under its name: requests pick it with `model`.
"""
from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import Field

from levante.errors import InvalidRequest, ModelNotFound, ServiceUnavailable
from levante.serve.protocol import Strict


class LoadLoraAdapterRequest(Strict):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(Strict):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM's; the name is what counts here


def register_lora(app: FastAPI, state) -> None:
    def engine_loop():
        if state.loop is None:
            raise ServiceUnavailable("the model is still loading; retry when /health answers 200")
        return state.loop

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest):
        loop = engine_loop()
        if body.lora_name == state.model_name:
            raise InvalidRequest(f"'{body.lora_name}' is the base model's name: pick another for the adapter")
        await asyncio.wrap_future(loop.call(lambda: loop.engine.load_lora(body.lora_name, body.lora_path)))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
        loop = engine_loop()
        if body.lora_name not in state.lora_adapters():
            raise ModelNotFound(f"no LoRA adapter named '{body.lora_name}' is loaded")
        await asyncio.wrap_future(loop.call(lambda: loop.engine.unload_lora(body.lora_name)))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
