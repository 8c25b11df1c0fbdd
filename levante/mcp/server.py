"""levante as an MCP server: `levante serve --mcp-port P` answers MCP clients at http://HOST:P/mcp.

Streamable HTTP, one tool, `chat`: a message (or a whole conversation) in, the model's answer out.
It takes the same road as /v1/chat/completions (chat template, sampling, the MCP tool loop when
levante has MCP servers of its own), on the same engine, next to the OpenAI API on --port.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

import uvicorn

from levante.errors import LevanteError

CHAT_DESCRIPTION = ("Ask the language model served by levante. Give `message` for a single question, or "
                    "`messages` (OpenAI chat format: [{role, content}]) for a conversation; the reply is the "
                    "model's answer as text.")


async def answer(state, body) -> dict:
    """One non-streamed chat completion for `body` (a ChatCompletionRequest), as /v1/chat/completions gives."""
    from levante.serve import openai_format as fmt
    from levante.serve.chat import plan_chat
    from levante.serve.mcp_loop import McpChat, offers_mcp_tools

    state.check(body.model)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if offers_mcp_tools(state, body):
        return await McpChat(state, body).run(rid, created)
    plan = plan_chat(state.llm, body)
    final = None
    async for final in state.generate(plan.prompt_ids, plan.params):
        pass
    return fmt.chat_response(plan, rid, created, state.model_name, final)


def create_mcp_server(state):
    """The MCP server object (mcp's MCPServer) with levante's `chat` tool."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from levante.serve.protocol import ChatCompletionRequest

    server = MCPServer(name="levante", instructions="A local LLM. Call `chat` to ask it something.",
                       log_level="WARNING")

    @server.tool(name="chat", description=CHAT_DESCRIPTION)
    async def chat(message: str | None = None, messages: list[dict[str, Any]] | None = None,
                   system: str | None = None, max_tokens: int | None = None,
                   temperature: float | None = None) -> str:
        if (message is None) == (messages is None):
            raise ToolError("give exactly one of `message` or `messages`")
        conversation = list(messages) if messages is not None else [{"role": "user", "content": message}]
        if system:
            conversation.insert(0, {"role": "system", "content": system})
        try:
            body = ChatCompletionRequest.model_validate(
                {"messages": conversation, "max_tokens": max_tokens, "temperature": temperature})
            response = await answer(state, body)
        except LevanteError as e:
            raise ToolError(str(e)) from None
        except ValueError as e:  # pydantic's ValidationError: a malformed conversation
            raise ToolError(f"invalid arguments: {e.errors()[0]['msg'] if hasattr(e, 'errors') else e}") from None
        return response["choices"][0]["message"]["content"] or ""

    return server


def build_mcp_http_server(state, host: str, port: int, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for the MCP endpoint at /mcp; run it next to the OpenAI one."""
    app = create_mcp_server(state).streamable_http_app(streamable_http_path="/mcp", host=host)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                         timeout_graceful_shutdown=5))
