"""The one error shape every client of the API sees, in an answer or in the middle of a stream.

OpenAI's clients (its SDKs, Open WebUI, LangChain...) read `{"error": {"message", "type",
"param", "code"}}` and show `message`; anything else ends up as "unknown error". Keeping
the shape here lets the handlers raise an APIError anywhere and answer with one function.

Messages name models, never the server's absolute paths: an RKLLMError that mentions a
file under the models folder is rewritten relative to it before a client reads it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # aiohttp and the engine's errors are only needed by the functions that use them
    from aiohttp import web

    from exo_rkllm.errors import RKLLMError

# OpenAI's own `type` words. 429: OpenAI answers rate limits with `rate_limit_exceeded` codes
# and a type that varied over time ("requests", "tokens"); the OpenAI-compatible servers and
# proxies clients meet (LiteLLM, OpenRouter-style gateways) say "rate_limit_error", which the
# SDKs ignore anyway (they map the HTTP status to RateLimitError). We say "rate_limit_error".
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          429: "rate_limit_error"}


def default_type(status: int) -> str:
    """The OpenAI error `type` for an HTTP status."""
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


class APIError(Exception):
    """An error the API answers with: an HTTP status plus OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:  # noqa: A002 - OpenAI's field name
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.type = type or default_type(self.status)

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"

    def error(self) -> dict[str, Any]:
        """The inner error object (what a stream's error chunk carries)."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def body(self) -> dict[str, Any]:
        """The JSON body of an error answer, exactly OpenAI's shape."""
        return {"error": self.error()}

    @classmethod
    def from_rkllm(cls, exc: "RKLLMError", *, redact: Sequence[Path | str] = ()) -> "APIError":
        """The answer for an engine error: its status and code, its message with the paths under
        `redact` (the models folder, the tokenizer folder) made relative to them.

        499 (the request was cancelled) is kept as it is: nginx's "client closed request",
        which only logs and proxies see, since the client is gone."""
        status = int(getattr(exc, "http_status", 500) or 500)
        code = getattr(exc, "code", None) or type(exc).__name__
        return cls(status, redact_paths(str(exc) or type(exc).__name__, redact), code=code)


def _root_forms(roots: Sequence[Path | str]) -> list[str]:
    """Each root as it may appear in a message: as given, expanded, resolved; longest first so a
    nested root wins over its parent."""
    forms: set[str] = set()
    for root in roots:
        path = Path(root).expanduser()
        candidates = [str(root), str(path)]
        try:
            candidates.append(str(path.resolve()))
        except (OSError, RuntimeError):
            pass
        for text in candidates:
            text = text.rstrip("/\\")
            if text and (text.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", text)):
                forms.add(text)
    return sorted(forms, key=len, reverse=True)


def redact_paths(message: str, roots: Sequence[Path | str]) -> str:
    """`message` with each absolute path under one of `roots` written relative to that root
    (the root itself as its folder name), so a client learns which model, not where it lives."""
    for root in _root_forms(roots):
        name = Path(root).name or root
        pattern = re.compile(re.escape(root) + r"([/\\]+)?")

        def relative(match: re.Match[str], name: str = name) -> str:
            following = match.string[match.end():match.end() + 1]
            if match.group(1) and following and not following.isspace() and following not in "'\"`,;)]}":
                return ""  # a path under the root: what follows is already relative to it
            after = match.string[match.end() + 1:match.end() + 2]
            if not match.group(1) and following and (following.isalnum() or following in "_-" or (
                    following == "." and after and not after.isspace())):
                return match.group(0)  # another folder that merely starts the same (/models2)
            return name + (match.group(1) or "")[:1] if match.group(1) else name

        message = pattern.sub(relative, message)
    return message


def error_response(err: APIError) -> "web.Response":
    """The aiohttp answer for `err`: OpenAI's JSON error body with its status."""
    from aiohttp import web

    return web.json_response(err.body(), status=err.status, content_type="application/json")


def error_chunk(err: APIError, *, id: str, created: int, model: str,  # noqa: A002 - OpenAI's field name
                object: str = "chat.completion.chunk") -> dict[str, Any]:  # noqa: A002
    """The chunk that ends a stream that failed after it started (the status is already 200).

    Open WebUI (backend/open_webui/utils/middleware.py, its stream handler) reads each chunk's
    `choices`; only a chunk whose `choices` is empty or missing is checked for `error`, and a
    truthy `error` there is sent to the page, which shows its `message` ("Uh-oh! There was an
    issue with the response." + message). So `choices` must be `[]` and `error` OpenAI's inner
    error object, never alongside a delta."""
    return {"id": id, "object": object, "created": int(created), "model": model, "choices": [],
            "error": err.error()}
