"""levante as an MCP server: `levante serve --mcp-port P` answers MCP clients at http://HOST:P/mcp.

Streamable HTTP, one tool, `chat`: a message (or a whole conversation, images included) in, the
model's answer out. It is one more adapter over the server's request pipeline (serve/pipeline.py):
the same checks, limits, local-media policy, planning off the event loop and engine as
/v1/chat/completions, and the same API key (serve/http.py guards this port as it guards --port).
"""
from __future__ import annotations

from typing import Any

import uvicorn

from levante.errors import LevanteError

CHAT_DESCRIPTION = ("Ask the language model served by levante. Give `message` for a single question, or "
                    "`messages` (OpenAI chat format: [{role, content}]) for a conversation; the reply is the "
                    "model's answer as text.")


def create_mcp_server(state):
    """The MCP server object (mcp's MCPServer) with levante's `chat` tool."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from pydantic import ValidationError

    from levante.serve.app import chat_completion
    from levante.serve.http import BadBody, check_json
    from levante.serve.protocol import ChatCompletionRequest, validation_error

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
        request = {"messages": conversation, "max_tokens": max_tokens, "temperature": temperature}
        try:
            check_json(request, state.limits.max_json_depth)
            response = await chat_completion(state, ChatCompletionRequest.model_validate(request))
        except (LevanteError, BadBody) as e:
            raise ToolError(str(getattr(e, "detail", e))) from None
        except ValidationError as e:  # a malformed conversation
            raise ToolError(f"invalid arguments: {validation_error(e.errors())[0]}") from None
        return response["choices"][0]["message"]["content"] or ""

    return server


def build_mcp_http_server(state, host: str, port: int, api_key: str | None = None,
                          log_level: str = "warning", sites=None) -> uvicorn.Server:
    """A uvicorn server for the MCP endpoint at /mcp, behind the same guards as the OpenAI port: the
    same site policy (serve/sites.py; default: the names of `host`) replaces the MCP SDK's own Host
    and Origin check, which it applies on loopback binds only."""
    from mcp.server.transport_security import TransportSecuritySettings

    from levante.serve.http import guard, uvicorn_server
    from levante.serve.sites import SitePolicy

    one_gate = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    app = create_mcp_server(state).streamable_http_app(streamable_http_path="/mcp", host=host,
                                                       transport_security=one_gate)
    return uvicorn_server(guard(app, state.limits, api_key, sites or SitePolicy(host)), host, port, state.limits,
                          log_level)
