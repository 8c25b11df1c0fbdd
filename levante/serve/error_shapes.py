"""Error bodies in the shape of the API a path belongs to: OpenAI's everywhere, Anthropic's under
/v1/messages (serve/anthropic.py). The status is the same either way; only the JSON differs.

    OpenAI     {"error": {"message", "type", "param", "code"}}
    Anthropic  {"type": "error", "error": {"type", "message"}}
"""
from __future__ import annotations

ANTHROPIC_PATH = "/v1/messages"
# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); 503 is its "overloaded".
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 409: "invalid_request_error", 413: "request_too_large",
                   429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}


def is_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


def anthropic_error(status: int, message: str) -> dict:
    kind = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def for_path(path: str, status: int, openai_body: dict) -> dict:
    """`openai_body` (an OpenAI error JSON) as the API of `path` writes its errors."""
    if is_anthropic(path):
        return anthropic_error(status, openai_body["error"]["message"])
    return openai_body
