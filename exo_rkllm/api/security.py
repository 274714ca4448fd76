"""Who may call the API: browser origins, an API key, exo's admin routes; errors in OpenAI's shape.

Why this exists. Legacy exo serves its API with no authentication on 0.0.0.0:52415 and sets up
aiohttp_cors with `"*"` origins and `allow_credentials=True`, which reflects *any* Origin. Worse,
a browser sends a "simple" cross-origin POST (a form post, or `fetch(..., {mode: "no-cors"})`)
without asking first, so any web page a user opens can `POST /quit` and stop the node, or start
downloads: CORS headers only decide whether the page may *read* the answer, never whether the
request runs. The only server-side defence is to refuse, before any handler runs, a request whose
`Origin` header names a site that is not allowed. Browsers always send `Origin` on cross-origin
POST/PUT/DELETE (simple or not) and on every CORS-mode fetch; programs (curl, the OpenAI SDKs,
Open WebUI's server-side calls) send none and are not affected.

The pieces, mounted on exo's aiohttp app by the caller (`install` does all of it):

- `security_middlewares(config)`: three new-style middlewares, in this order:
  1. origin check (RKLLM_CORS_ORIGINS): a request whose Origin is neither allowed nor the
     page's own origin gets 403; CORS preflights from allowed origins are answered here, for
     every route, whether or not aiohttp_cors knows it;
  2. API key (RKLLM_API_KEY): `Authorization: Bearer <key>`, compared in constant time;
  3. admin routes (RKLLM_ADMIN_ROUTES): `POST /quit`, `POST /download`,
     `DELETE /models/{model_name}` answer 403 unless enabled.
- `strip_foreign_cors(config)`: an `on_response_prepare` signal handler that fixes the CORS
  headers of every response (see "Interplay with aiohttp_cors" below).
- `openai_json_errors(prefixes)`: a middleware that turns aiohttp's own HTTP errors (unknown
  route, wrong method, body too large...) under `/v1/` into OpenAI's error JSON.

Interplay with aiohttp_cors (exo sets it up before we are mounted):

- aiohttp_cors appends its own `on_response_prepare` handler, which, on exo's routes, adds
  `Access-Control-Allow-Origin: <the request's origin>` and `Access-Control-Allow-Credentials:
  true` for *every* origin, and *asserts* that `Access-Control-Allow-Origin` is not set yet.
  So nothing here sets CORS headers before it runs: the middlewares never put CORS headers on
  the responses they let through; `strip_foreign_cors`, appended to `app.on_response_prepare`
  *after* aiohttp_cors's handler (signal handlers run in order), rewrites them last. It must be
  appended after `aiohttp_cors.setup(app)`, else aiohttp_cors's assertion fails on allowed
  cross-origin requests.
- Doing this in the signal, not in a middleware, is also what makes it work for streamed
  answers: a StreamResponse (SSE) is prepared inside its handler, so its headers are on the
  wire before any middleware sees the response again; the signal runs inside `prepare()`.
- Preflights (`OPTIONS` + `Access-Control-Request-Method`) never reach aiohttp_cors's preflight
  handler: the origin middleware answers them (allowed origin) or refuses them (403), so our
  routes that aiohttp_cors does not know get correct preflight answers too.
- For a disallowed origin the 403 still passes through aiohttp_cors's signal handler, which
  would label it readable by that origin; `strip_foreign_cors` removes every
  `Access-Control-*` header again, so the page cannot even read the refusal.
- With `RKLLM_CORS_ORIGINS=*` any origin is allowed (exo's own openness) but
  `Access-Control-Allow-Credentials` is removed: the API authenticates with a Bearer header,
  not cookies, and a cookie-based login proxy in front of exo must not become readable by
  every site. Origins listed by name keep `Allow-Credentials: true`.

Same origin: the page exo serves itself (tinychat) sends its own origin on POSTs. It is
recognised by comparing the Origin's host and port with the request's `Host` header (or
`X-Forwarded-Host`, which a browser page cannot set on a simple request, so an attacker cannot
use it without a preflight, which is refused). The scheme is not compared: behind a TLS
reverse proxy exo sees plain http while the page is https, and two schemes cannot share one
host and port. A DNS-rebinding attacker's page *is* same-origin by construction; only the API
key defends against that.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Awaitable, Callable, Iterable

from aiohttp import hdrs, web
from yarl import URL

from exo_rkllm.config import Config
from exo_rkllm.api.errors import APIError, error_response

log = logging.getLogger("exo_rkllm.api.security")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# exo's routes that change the node rather than serve a request: (method, path pattern).
ADMIN_ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/quit"),
    ("POST", "/download"),
    ("DELETE", "/models/{model_name}"),
)

# Paths that stay open when an API key is set. `/healthcheck` answers only {"status": "ok"}:
# like llama-server's `/health` and vLLM's `/health`, it is left open so that load balancers,
# container health checks and uptime monitors work without the key.
OPEN_PATHS: frozenset[str] = frozenset({"/healthcheck", "/health"})
# The web chat's pages; other static files are recognised by their route (a StaticResource).
OPEN_PAGES: frozenset[str] = frozenset({"/", "/index.html"})
# Prefixes that always need the key, even where exo's static catch-all (`/`) would match.
KEYED_PREFIXES: tuple[str, ...] = ("/v1/", "/chat/")

PREFLIGHT_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
PREFLIGHT_HEADERS = ("Authorization", "Content-Type")
PREFLIGHT_MAX_AGE = "600"
ADMIN_DISABLED = "{method} {path} is disabled; set RKLLM_ADMIN_ROUTES=1 to enable it"

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 token)
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class OriginVerdict(Enum):
    """How a request's Origin header relates to the allowed origins."""
    NONE = "none"              # no Origin header: not a browser's cross-origin request
    SAME = "same"              # the page exo serves itself
    ALLOWED = "allowed"        # listed in RKLLM_CORS_ORIGINS
    ANY = "any"                # allowed because RKLLM_CORS_ORIGINS is `*`
    FORBIDDEN = "forbidden"    # any other site


def _normalize_origin(text: str) -> str | None:
    """`scheme://host:port` in lower case with the port spelled out, or None when `text` is
    not a URL origin (`null`, garbage)."""
    text = text.strip().rstrip("/")
    if "://" not in text:
        return None
    try:
        url = URL(text)
    except (ValueError, TypeError):
        return None
    if not url.scheme or not url.host:
        return None
    scheme = url.scheme.lower()
    port = url.explicit_port or _DEFAULT_PORTS.get(scheme)
    return f"{scheme}://{url.host.lower()}:{port}"


def _authority(text: str, scheme: str) -> tuple[str, int | None] | None:
    """(host, port) of a `Host`-style authority, its port defaulting to `scheme`'s."""
    text = text.split(",")[0].strip()
    if not text:
        return None
    try:
        url = URL(f"{scheme}://{text}")
    except (ValueError, TypeError):
        return None
    if not url.host:
        return None
    return url.host.lower(), url.explicit_port or _DEFAULT_PORTS.get(scheme)


@dataclass(frozen=True)
class OriginPolicy:
    """RKLLM_CORS_ORIGINS, parsed once: which browser origins may call the API."""
    any_origin: bool
    origins: frozenset[str]  # normalized origins, plus literal entries such as `null`

    @classmethod
    def from_setting(cls, text: str) -> "OriginPolicy":
        entries = [e.strip() for e in (text or "").split(",") if e.strip()]
        origins = set()
        for entry in entries:
            if entry == "*":
                continue
            origins.add(_normalize_origin(entry) or entry.lower())
        return cls(any_origin="*" in entries, origins=frozenset(origins))

    def judge(self, request: web.Request) -> OriginVerdict:
        """The verdict for `request` (a URL parse or two: cheap enough to do in the middleware and
        again in the signal handler, which may be built from different settings in tests)."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return OriginVerdict.NONE
        normalized = _normalize_origin(origin)
        if normalized is not None:
            if self._same_origin(request, normalized):
                return OriginVerdict.SAME
            if normalized in self.origins:
                return OriginVerdict.ALLOWED
        elif origin.strip().lower() in self.origins:
            return OriginVerdict.ALLOWED  # `null` listed explicitly
        return OriginVerdict.ANY if self.any_origin else OriginVerdict.FORBIDDEN

    @staticmethod
    def _same_origin(request: web.Request, normalized: str) -> bool:
        url = URL(normalized)
        scheme = url.scheme
        target = (url.host, url.port)
        for header in (hdrs.HOST, hdrs.X_FORWARDED_HOST):
            value = request.headers.get(header)
            if value and _authority(value, scheme) == target:
                return True
        return False


def _is_preflight(request: web.Request) -> bool:
    return (request.method == hdrs.METH_OPTIONS and hdrs.ORIGIN in request.headers
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers)


def _add_vary_origin(response: web.StreamResponse) -> None:
    vary = response.headers.get(hdrs.VARY, "")
    if "origin" not in {v.strip().lower() for v in vary.split(",")} and vary.strip() != "*":
        response.headers[hdrs.VARY] = f"{vary}, Origin" if vary.strip() else "Origin"


def _strip_cors(response: web.StreamResponse) -> None:
    for name in [n for n in response.headers if n.lower().startswith("access-control-")]:
        del response.headers[name]


def _set_cors(response: web.StreamResponse, origin: str, verdict: OriginVerdict) -> None:
    """The CORS headers of an answer readable by `origin` (reflected, never `*`, so that a
    listed origin may send credentials)."""
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
    if verdict is OriginVerdict.ANY:
        response.headers.popall(hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS, None)
    else:
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
    _add_vary_origin(response)


def _api_error(status: int, message: str, *, code: str | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
    response = error_response(APIError(status, message, code=code))
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


_warned: set[str] = set()


def _log_refused(origin: str, request: web.Request) -> None:
    """A warning the first time an origin is refused (a bounded set), debug afterwards."""
    if origin not in _warned and len(_warned) < 64:
        _warned.add(origin)
        log.warning("refused %s %s from web origin %r (not in RKLLM_CORS_ORIGINS)",
                    request.method, request.path, origin)
    else:
        log.debug("refused %s %s from web origin %r", request.method, request.path, origin)


def origin_middleware(config: Config) -> Any:
    """403 for a request from a web origin that is not allowed; answers allowed preflights."""
    policy = OriginPolicy.from_setting(config.cors_origins)

    @web.middleware
    async def check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        verdict = policy.judge(request)
        if verdict is OriginVerdict.FORBIDDEN:
            origin = request.headers.get(hdrs.ORIGIN, "")
            _log_refused(origin, request)
            response = _api_error(403, f"requests from web origin {origin!r} are not allowed; add it to "
                                       "RKLLM_CORS_ORIGINS to allow it", code="origin_not_allowed")
            _add_vary_origin(response)
            return response
        if verdict is not OriginVerdict.NONE and _is_preflight(request):
            return _preflight_answer(request, verdict)
        return await handler(request)

    return check_origin


def _preflight_answer(request: web.Request, verdict: OriginVerdict) -> web.Response:
    """204 for an allowed preflight: the methods and headers a browser may then use. The
    requested headers are echoed (the OpenAI JS SDK sends many `x-stainless-*` ones) plus
    Authorization and Content-Type; anything that is not a header name is dropped."""
    response = web.Response(status=204)
    requested = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
    names = list(PREFLIGHT_HEADERS)
    seen = {n.lower() for n in names}
    for name in (n.strip() for n in requested.split(",")):
        if name and _TOKEN.match(name) and name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = PREFLIGHT_METHODS
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ", ".join(names)
    response.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = PREFLIGHT_MAX_AGE
    _set_cors(response, request.headers[hdrs.ORIGIN], verdict)
    return response


def needs_key(request: web.Request) -> bool:
    """Whether `request` needs the API key: everything but preflights, the web chat's pages and
    static files, and the health check. Deny by default, so a route added later is covered."""
    if _is_preflight(request):
        return False
    path = request.path
    if path.startswith(KEYED_PREFIXES) or path in ("/v1", "/chat"):
        return True
    if path in OPEN_PATHS:
        return False
    if request.method in (hdrs.METH_GET, hdrs.METH_HEAD):
        if path in OPEN_PAGES:
            return False
        route = getattr(request.match_info, "route", None)
        if isinstance(getattr(route, "resource", None), web.StaticResource):
            return False
    return True


def api_key_middleware(config: Config) -> Any:
    """401 (OpenAI's shape, `WWW-Authenticate: Bearer`) without `Authorization: Bearer <key>`."""
    key = config.api_key
    digest = hashlib.sha256(key.encode()).digest()

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not key or not needs_key(request):
            return await handler(request)
        scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _api_error(401, "missing API key: send the header `Authorization: Bearer <key>` "
                                   "(RKLLM_API_KEY)", code="invalid_api_key",
                              headers={hdrs.WWW_AUTHENTICATE: "Bearer"})
        # Hash both sides so the comparison takes the same time whatever the token's length.
        if not hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), digest):
            return _api_error(401, "incorrect API key provided", code="invalid_api_key",
                              headers={hdrs.WWW_AUTHENTICATE: 'Bearer error="invalid_token"'})
        return await handler(request)

    return check_key


def _pattern(path: str) -> re.Pattern[str]:
    """A regular expression for an aiohttp path pattern (`{name}` matches one path segment)."""
    parts = re.split(r"(\{[^}/]+\})", path)
    return re.compile("^" + "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts) + "$")


_ADMIN = tuple((method, _pattern(path), path) for method, path in ADMIN_ROUTES)


def admin_route(request: web.Request) -> str | None:
    """The ADMIN_ROUTES pattern `request` would reach, or None. Matched on the path itself and
    on the route aiohttp resolved, so neither a route renamed by the router nor an odd path
    spelling slips through."""
    route = getattr(request.match_info, "route", None)
    canonical = getattr(getattr(route, "resource", None), "canonical", None)
    for method, pattern, path in _ADMIN:
        if request.method == method and (pattern.match(request.path) or canonical == path):
            return path
    return None


def admin_middleware(config: Config) -> Any:
    """403 for exo's admin routes unless RKLLM_ADMIN_ROUTES is on; their handler never runs."""
    enabled = config.admin_routes

    @web.middleware
    async def check_admin(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not enabled and admin_route(request) is not None:
            return _api_error(403, ADMIN_DISABLED.format(method=request.method, path=request.path),
                              code="admin_route_disabled")
        return await handler(request)

    return check_admin


def security_middlewares(config: Config) -> list:
    """[origin check, API key, admin routes]: put them before exo's middlewares (outermost)."""
    return [origin_middleware(config), api_key_middleware(config), admin_middleware(config)]


def strip_foreign_cors(config: Config) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An `on_response_prepare` handler that leaves every response with correct CORS headers:
    none at all for a request from a disallowed origin (aiohttp_cors adds them for any origin),
    and for an allowed origin `Access-Control-Allow-Origin: <origin>`, `Vary: Origin`, and
    `Allow-Credentials` only for origins listed by name. Append it after aiohttp_cors.setup()."""
    policy = OriginPolicy.from_setting(config.cors_origins)

    async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
        verdict = policy.judge(request)
        if verdict is OriginVerdict.NONE:
            return
        if verdict is OriginVerdict.FORBIDDEN:
            _strip_cors(response)
            _add_vary_origin(response)
            return
        _set_cors(response, request.headers[hdrs.ORIGIN], verdict)

    return on_response_prepare


# -- OpenAI's error JSON for aiohttp's own HTTP errors ----------------------------------------------
_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 408: "request_timeout", 411: "length_required",
          413: "request_too_large", 414: "uri_too_long", 415: "unsupported_media_type",
          422: "unprocessable_entity", 429: "too_many_requests"}
_KEEP_OUT = frozenset({"content-type", "content-length", "transfer-encoding", "content-encoding"})


async def _methods_without_static(request: web.Request) -> set[str]:
    """The methods the non-static routes allow for the request's path. exo mounts its static
    folder at `/`, which matches every path for GET/HEAD: aiohttp then answers an unknown
    `POST /v1/foo` with 405 "Allow: GET, HEAD" when the truth is 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if isinstance(resource, web.StaticResource):
            continue
        _, methods = await resource.resolve(request)
        allowed.update(methods)
    return allowed


def _static_catch_all(request: web.Request, prefixes: tuple[str, ...]) -> bool:
    """Whether a static folder mounted *outside* the API prefixes (exo's `/`) took the request."""
    resource = getattr(getattr(request.match_info, "route", None), "resource", None)
    if not isinstance(resource, web.StaticResource):
        return False
    mount = resource.canonical.rstrip("/") + "/"
    return not mount.startswith(prefixes)


def _already_openai(exc: web.HTTPException) -> bool:
    text = exc.text or ""
    return (exc.content_type == "application/json" and text.lstrip().startswith("{")
            and '"error"' in text)


def openai_json_errors(prefixes: Iterable[str] = ("/v1/",)) -> Any:
    """A middleware: an HTTPException with an error status raised under `prefixes` (aiohttp's
    404 for an unknown route, 405 for a wrong method, 413 for a too large body, a handler's
    `raise web.HTTPBadRequest(text=...)`) becomes OpenAI's error JSON instead of text/plain,
    keeping the exception's headers (Allow, WWW-Authenticate...)."""
    prefixes = tuple(prefixes)

    @web.middleware
    async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(prefixes) and _static_catch_all(request, prefixes):
            # exo's static folder at `/` takes every GET; a missing file becomes a 404 only inside
            # FileResponse.prepare() (aiohttp >= 3.10), past any middleware: answer it here.
            return await _as_openai(request, web.HTTPNotFound())
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400 or not request.path.startswith(prefixes) or _already_openai(exc):
                raise
            return await _as_openai(request, exc)

    return json_errors


async def _as_openai(request: web.Request, exc: web.HTTPException) -> web.Response:
    status = exc.status
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in _KEEP_OUT}
    where = f"{request.method} {request.path}"
    if status == 405:
        allowed = await _methods_without_static(request)
        if not allowed:
            status = 404
            headers.pop(hdrs.ALLOW, None)
        else:
            headers[hdrs.ALLOW] = ", ".join(sorted(allowed))
    text = (exc.text or "").strip()
    if text and text != f"{exc.status}: {exc.reason}" and status == exc.status:
        message = text  # a handler's own words (`raise web.HTTPNotFound(text="no model x")`)
    elif status == 404:
        message = f"no route for {where}"
    elif status == 405:
        message = f"method {request.method} is not allowed for {request.path}; allowed: {headers[hdrs.ALLOW]}"
    else:
        message = f"{exc.reason} ({where})"
    code = _CODES.get(status) or re.sub(r"[^a-z0-9]+", "_", (exc.reason or "error").lower()).strip("_")
    return _api_error(status, message, code=code, headers=headers)


def install(app: web.Application, config: Config, *, json_error_prefixes: Iterable[str] = ("/v1/",)) -> None:
    """Mount everything on `app` (before it starts): the three security middlewares, then the
    JSON-errors one, in front of the app's own (exo's timeout and logging ones), so a refused
    request is refused before anything else looks at it and the JSON errors cover whatever the
    inner middlewares and handlers raise; and the CORS signal handler after aiohttp_cors's.
    Call it after aiohttp_cors.setup(app)."""
    app.middlewares[0:0] = [*security_middlewares(config), openai_json_errors(json_error_prefixes)]
    app.on_response_prepare.append(strip_foreign_cors(config))
