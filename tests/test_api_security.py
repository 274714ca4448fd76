"""The API's gatekeepers: web origins (the /quit attack), the API key, exo's admin routes, JSON errors.

Two kinds of app are served on a free port:

- in this interpreter, an app with exo's route table and its static catch-all at `/`, plus a
  stand-in for aiohttp_cors's response signal (aiohttp_cors is not installed in .venv; the
  stand-in adds the same headers for every origin and makes the same assertion);
- in the legacy-exo Python (tests/legacy_exo.py; skipped when there is none), exo's real
  ChatGPTAPI app with the real aiohttp_cors 0.7.0 and aiohttp 3.10, with `install()` applied,
  and an unprotected one to show the attack is real.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web

from exo_rkllm.api.security import (ADMIN_ROUTES, install, openai_json_errors, security_middlewares,
                                    strip_foreign_cors)
from exo_rkllm.api.sse import EventStream
from exo_rkllm.config import Config

from real_exo import EXO_PYTHON, requires_exo

KEY = "sk-rkllm-test-key"
EVIL = "https://evil.example"
APP = "https://app.example.com"
BOUND = 30.0  # seconds: only a guard against hanging
RAN: web.AppKey[list[str]] = web.AppKey("ran", list)


def _cors_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower().startswith("access-control-")}


def _vary(resp: aiohttp.ClientResponse) -> set[str]:
    return {v.strip().lower() for v in resp.headers.get("Vary", "").split(",") if v.strip()}


async def _assert_openai_error(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert resp.status == status, (resp.status, await resp.text())
    assert resp.content_type == "application/json", resp.content_type
    body = await resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# -- an exo-like app in this interpreter -------------------------------------------------------------
async def exo_like_cors(request: web.Request, response: web.StreamResponse) -> None:
    """What aiohttp_cors 0.7.0 does, as exo configures it, on exo's routes: reflect any Origin, allow
    credentials, expose every header; assert nobody set Allow-Origin before it. Preflights are
    left to its OPTIONS routes, which our middleware never lets run."""
    if request.method == "OPTIONS" or "Origin" not in request.headers:
        return
    assert "Access-Control-Allow-Origin" not in response.headers
    response.headers["Access-Control-Expose-Headers"] = ",".join(response.headers.keys())
    response.headers["Access-Control-Allow-Origin"] = request.headers["Origin"]
    response.headers["Access-Control-Allow-Credentials"] = "true"


def exo_like_app(config: Config, static_dir: Path, *, client_max_size: int = 1024 ** 2) -> web.Application:
    app = web.Application(client_max_size=client_max_size)
    ran: list[str] = []
    app[RAN] = ran

    def record(name: str, **payload: Any):
        async def handler(request: web.Request) -> web.StreamResponse:
            ran.append(name)
            return web.json_response({"ok": name, **payload})
        return handler

    async def chat(request: web.Request) -> web.StreamResponse:
        ran.append("chat")
        stream = EventStream(request)  # prepared inside the handler: its headers go out before any middleware
        await stream.send({"choices": [{"delta": {"content": "hi"}}]})
        await stream.done()
        return stream.response

    async def bad(request: web.Request) -> web.StreamResponse:
        raise web.HTTPBadRequest(text="the body is not valid JSON")

    async def no_model(request: web.Request) -> web.StreamResponse:
        raise web.HTTPNotFound(text=f"no model {request.match_info['name']}")

    async def echo(request: web.Request) -> web.StreamResponse:
        return web.json_response(await request.json())

    app.router.add_get("/models", record("models"))
    app.router.add_get("/v1/models", record("v1_models"))
    app.router.add_post("/chat/completions", record("chat_legacy"))
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/bad", bad)
    app.router.add_post("/v1/echo", echo)
    app.router.add_get("/v1/models/{name}", no_model)
    app.router.add_get("/modelpool", record("modelpool"))
    app.router.add_get("/healthcheck", record("healthcheck", status="ok"))
    app.router.add_post("/quit", record("quit"))
    app.router.add_delete("/models/{model_name}", record("delete_model"))
    app.router.add_get("/initial_models", record("initial_models"))
    app.router.add_post("/download", record("download"))
    app.router.add_get("/topology", record("topology"))
    app.router.add_get("/", record("root"))
    app.router.add_static("/", static_dir)  # exo mounts tinychat at `/`: it matches every path for GET
    app.on_response_prepare.append(exo_like_cors)  # aiohttp_cors.setup() runs in exo's __init__...
    install(app, config)  # ...and we are mounted afterwards
    return app


class Served:
    def __init__(self, app: web.Application, runner: web.AppRunner, port: int) -> None:
        self.app, self.runner, self.port = app, runner, port
        self.url = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession()

    @property
    def ran(self) -> list[str]:
        return self.app[RAN]

    def request(self, method: str, path: str, **kwargs: Any):
        return self.session.request(method, self.url + path, **kwargs)

    async def close(self) -> None:
        await self.session.close()
        await self.runner.cleanup()


@pytest.fixture
def static_dir(tmp_path: Path) -> Path:
    (tmp_path / "index.html").write_text("<html>chat</html>")
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "app.js").write_text("console.log(1)")
    return tmp_path


@pytest.fixture
async def serve(static_dir: Path) -> AsyncIterator[Any]:
    """start(config) -> Served: the exo-like app with our pieces installed, on a free port."""
    served: list[Served] = []

    async def start(config: Config, **kwargs: Any) -> Served:
        app = exo_like_app(config, static_dir, **kwargs)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        served.append(Served(app, runner, runner.addresses[0][1]))
        return served[-1]

    yield start
    for s in served:
        await s.close()


# -- a) web origins ------------------------------------------------------------------------------------
SIMPLE_POST = {"Content-Type": "text/plain"}  # a "simple" request: a browser sends it with no preflight


async def test_a_simple_cross_origin_post_to_quit_is_refused_before_its_handler(serve) -> None:
    s = await serve(Config(admin_routes=True))  # admin routes on: only the origin check stands in the way
    async with s.request("POST", "/quit", headers={"Origin": EVIL, **SIMPLE_POST}, data="x") as resp:
        err = await _assert_openai_error(resp, 403)
        assert EVIL in err["message"] and err["code"] == "origin_not_allowed"
        assert _cors_headers(resp) == {}, "aiohttp_cors's headers for the foreign origin were left in"
        assert "origin" in _vary(resp)
    assert s.ran == []


async def test_with_any_origin_allowed_the_same_post_reaches_quit(serve) -> None:
    """The control of the test above: with exo's own openness (`*`) the page does stop the node."""
    s = await serve(Config(admin_routes=True, cors_origins="*"))
    async with s.request("POST", "/quit", headers={"Origin": EVIL, **SIMPLE_POST}, data="x") as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == EVIL
        assert "Access-Control-Allow-Credentials" not in resp.headers  # never with `*`
    assert s.ran == ["quit"]


async def test_requests_without_origin_pass(serve) -> None:
    s = await serve(Config(admin_routes=True))
    for method, path in (("GET", "/v1/models"), ("POST", "/quit"), ("GET", "/models")):
        async with s.request(method, path) as resp:
            assert resp.status == 200, path
            assert _cors_headers(resp) == {}
    assert s.ran == ["v1_models", "quit", "models"]


async def test_the_page_exo_serves_itself_is_same_origin(serve) -> None:
    s = await serve(Config(admin_routes=True))
    same = [{"Origin": s.url},  # Host: 127.0.0.1:<port>
            {"Origin": f"http://localhost:{s.port}", "Host": f"localhost:{s.port}"},
            {"Origin": f"HTTP://LocalHost:{s.port}/", "Host": f"localhost:{s.port}"},
            # behind a TLS reverse proxy: exo sees http and the proxy's forwarded host
            {"Origin": "https://chat.example.org", "Host": f"127.0.0.1:{s.port}",
             "X-Forwarded-Host": "chat.example.org"},
            {"Origin": "https://chat.example.org", "Host": "chat.example.org"}]
    for headers in same:
        async with s.request("POST", "/v1/chat/completions", headers=headers, json={}) as resp:
            assert resp.status == 200, headers
            await resp.read()
    assert s.ran == ["chat"] * len(same)
    other = [{"Origin": f"http://127.0.0.1:{s.port + 1}"},  # another port is another origin
             {"Origin": f"http://localhost:{s.port}"},      # Host says 127.0.0.1
             {"Origin": "https://chat.example.org", "Host": "chat.example.org:8443"},
             {"Origin": "null"}]
    for headers in other:
        async with s.request("POST", "/quit", headers=headers) as resp:
            await _assert_openai_error(resp, 403)
    assert s.ran == ["chat"] * len(same)


async def test_listed_origins_get_correct_cors_headers_including_on_streams(serve) -> None:
    s = await serve(Config(cors_origins=f"{APP}, http://localhost:3000/"))
    async with s.request("GET", "/v1/models", headers={"Origin": APP}) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == APP
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
        assert "origin" in _vary(resp)
    # An SSE answer is prepared inside its handler: its CORS headers must come from the signal.
    async with s.request("POST", "/v1/chat/completions", headers={"Origin": "http://localhost:3000"},
                         json={}) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert "origin" in _vary(resp)
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    async with s.request("GET", "/v1/models", headers={"Origin": "http://localhost:3001"}) as resp:
        await _assert_openai_error(resp, 403)
        assert _cors_headers(resp) == {}
    assert s.ran == ["v1_models", "chat"]


async def test_preflights_are_answered_for_allowed_origins_and_refused_for_others(serve) -> None:
    s = await serve(Config(cors_origins=APP, api_key=KEY))
    asked = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, bad header"}
    # /v1/chat/completions has no OPTIONS route here: the middleware answers for every route.
    async with s.request("OPTIONS", "/v1/chat/completions", headers={"Origin": APP, **asked}) as resp:
        assert resp.status == 204  # and no key was asked for
        assert resp.headers["Access-Control-Allow-Origin"] == APP
        methods = {m.strip() for m in resp.headers["Access-Control-Allow-Methods"].split(",")}
        assert {"GET", "POST", "DELETE", "OPTIONS"} <= methods
        allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "x-stainless-os"} <= allowed
        assert "bad header" not in allowed
        assert "origin" in _vary(resp)
    async with s.request("OPTIONS", "/quit", headers={"Origin": EVIL, **asked}) as resp:
        await _assert_openai_error(resp, 403)
        assert _cors_headers(resp) == {}
    assert s.ran == []


async def test_null_origin_only_when_listed(serve) -> None:
    s = await serve(Config(cors_origins="null"))
    async with s.request("GET", "/v1/models", headers={"Origin": "null"}) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "null"
    async with s.request("GET", "/v1/models", headers={"Origin": EVIL}) as resp:
        await _assert_openai_error(resp, 403)


# -- b) the API key -------------------------------------------------------------------------------------
KEYED = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/models"), ("POST", "/chat/completions"),
         ("GET", "/topology"), ("GET", "/initial_models"), ("GET", "/modelpool"), ("POST", "/quit"),
         ("POST", "/download"), ("DELETE", "/models/foo"),
         ("GET", "/v1/not-a-route"),  # under /v1/ even where the static catch-all would answer
         ("POST", "/some/new/route")]  # deny by default: a route added later is covered
OPEN = [("GET", "/"), ("GET", "/index.html"), ("GET", "/static/app.js"), ("HEAD", "/static/app.js"),
        ("GET", "/healthcheck")]


async def test_every_api_route_needs_the_key(serve) -> None:
    s = await serve(Config(api_key=KEY, admin_routes=True))
    for auth in (None, "Bearer wrong-key", f"Basic {KEY}", "Bearer", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}"):
        headers = {"Authorization": auth} if auth else {}
        for method, path in KEYED:
            async with s.request(method, path, headers=headers, json={}) as resp:
                err = await _assert_openai_error(resp, 401)
                assert err["code"] == "invalid_api_key"
                assert resp.headers["WWW-Authenticate"].startswith("Bearer"), (method, path)
    assert s.ran == []
    for auth in (f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY} "):
        async with s.request("GET", "/v1/models", headers={"Authorization": auth}) as resp:
            assert resp.status == 200, auth
    for method, path in KEYED[:-2]:
        async with s.request(method, path, headers={"Authorization": f"Bearer {KEY}"}, json={}) as resp:
            assert resp.status == 200, (method, path)
            await resp.read()
    assert len(s.ran) == 3 + len(KEYED) - 2


async def test_the_web_chat_pages_and_health_check_stay_open(serve) -> None:
    s = await serve(Config(api_key=KEY))
    for method, path in OPEN:
        async with s.request(method, path) as resp:
            assert resp.status == 200, (method, path)
    async with s.request("GET", "/static/app.js") as resp:
        assert await resp.text() == "console.log(1)"


async def test_no_key_set_means_no_key_asked(serve) -> None:
    s = await serve(Config(api_key=""))
    async with s.request("GET", "/v1/models") as resp:
        assert resp.status == 200


# -- c) admin routes ----------------------------------------------------------------------------------
async def test_admin_routes_are_off_by_default_and_their_handlers_never_run(serve) -> None:
    s = await serve(Config())
    assert {(m, p) for m, p in ADMIN_ROUTES} == {("POST", "/quit"), ("POST", "/download"),
                                                  ("DELETE", "/models/{model_name}")}
    for method, path in (("POST", "/quit"), ("POST", "/download"), ("DELETE", "/models/llama-3.2-1b"),
                         ("POST", "/qu%69t")):  # an escaped spelling of the same path
        async with s.request(method, path, json={}) as resp:
            err = await _assert_openai_error(resp, 403)
            assert "RKLLM_ADMIN_ROUTES=1" in err["message"], err
    assert s.ran == []
    async with s.request("GET", "/models") as resp:  # GET /models is not DELETE /models/{name}
        assert resp.status == 200
    assert s.ran == ["models"]


async def test_admin_routes_on_reach_their_handlers(serve) -> None:
    s = await serve(Config(admin_routes=True))
    for method, path in (("POST", "/quit"), ("POST", "/download"), ("DELETE", "/models/llama-3.2-1b")):
        async with s.request(method, path, json={}) as resp:
            assert resp.status == 200
    assert s.ran == ["quit", "download", "delete_model"]


async def test_the_key_is_checked_before_the_admin_switch(serve) -> None:
    s = await serve(Config(api_key=KEY))
    async with s.request("POST", "/quit") as resp:
        await _assert_openai_error(resp, 401)
    async with s.request("POST", "/quit", headers={"Authorization": f"Bearer {KEY}"}) as resp:
        await _assert_openai_error(resp, 403)
    assert s.ran == []


# -- d) aiohttp's own errors in OpenAI's shape -------------------------------------------------------
async def test_unknown_routes_and_methods_under_v1_answer_openai_json(serve) -> None:
    s = await serve(Config(), client_max_size=1024)
    # GET: the static catch-all takes it and finds no file.
    async with s.request("GET", "/v1/nope") as resp:
        assert (await _assert_openai_error(resp, 404))["code"] == "not_found"
    # POST: only the static catch-all matches the path (for GET/HEAD): 404, not "405 Allow: GET, HEAD".
    async with s.request("POST", "/v1/nope") as resp:
        assert (await _assert_openai_error(resp, 404))["code"] == "not_found"
        assert "Allow" not in resp.headers
    # A real route with the wrong method: 405 with the route's own methods.
    async with s.request("DELETE", "/v1/models") as resp:
        assert (await _assert_openai_error(resp, 405))["code"] == "method_not_allowed"
        allow = {m.strip() for m in resp.headers["Allow"].split(",")}
        assert "GET" in allow and "DELETE" not in allow
    async with s.request("POST", "/v1/bad") as resp:
        assert (await _assert_openai_error(resp, 400))["message"] == "the body is not valid JSON"
    async with s.request("GET", "/v1/models/qwen") as resp:  # a handler's own 404 keeps its words
        err = await _assert_openai_error(resp, 404)
        assert err["message"] == "no model qwen" and err["code"] == "not_found"
    async with s.request("POST", "/v1/echo", json={"x": "y" * 4096}) as resp:  # over client_max_size
        await _assert_openai_error(resp, 413)
    # Outside the prefixes aiohttp's own answers are left alone.
    async with s.request("POST", "/nope") as resp:
        assert resp.status == 405 and resp.content_type == "text/plain"


async def test_openai_json_errors_alone_on_a_plain_app() -> None:
    app = web.Application(middlewares=[openai_json_errors(prefixes=("/v1/", "/api/"))])
    app.router.add_get("/v1/models", lambda r: web.json_response({}))
    app.router.add_get("/api/x", lambda r: web.json_response({}))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/v1/missing") as resp:
                assert (await _assert_openai_error(resp, 404))["code"] == "not_found"
            async with session.post(url + "/api/x") as resp:
                assert (await _assert_openai_error(resp, 405))["code"] == "method_not_allowed"
                assert "GET" in resp.headers["Allow"]
            async with session.get(url + "/other") as resp:
                assert resp.status == 404 and resp.content_type == "text/plain"
    finally:
        await runner.cleanup()


def test_security_middlewares_are_new_style_and_ordered() -> None:
    mws = security_middlewares(Config())
    assert len(mws) == 3 and all(getattr(m, "__middleware_version__", None) == 1 for m in mws)
    assert [m.__name__ for m in mws] == ["check_origin", "check_key", "check_admin"]
    assert callable(strip_foreign_cors(Config()))


# -- exo's real app (legacy exo's Python: aiohttp 3.10, aiohttp_cors 0.7.0) ------------------------------
SERVE_EXO = """
import asyncio, json, sys, types
from aiohttp import web
from exo.api.chatgpt_api import ChatGPTAPI
from exo_rkllm.config import Config
from exo_rkllm.api.security import install


class Registration:
    def on_next(self, callback):
        pass


class Callbacks:
    def register(self, name):
        return Registration()


class Server:
    async def stop(self):
        pass


# Enough of a Node for ChatGPTAPI's constructor and the routes used here.
node = types.SimpleNamespace(on_token=Callbacks(), on_opaque_status=Callbacks(), server=Server(),
                             inference_engine=None, topology=None)


async def main():
    ports = []
    for spec in json.loads(sys.argv[1]):
        api = ChatGPTAPI(node, "RKLLMInferenceEngine")  # sets up aiohttp_cors as exo does
        if spec is not None:
            install(api.app, Config(**spec))  # mounted after, as the lead mounts it
        runner = web.AppRunner(api.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(runner.addresses[0][1])
    print("PORTS " + json.dumps(ports), flush=True)
    await asyncio.Event().wait()  # until killed, or until exo's /quit handler cancels every task


asyncio.run(main())
"""


class ExoApps:
    """One legacy-exo process serving exo's real ChatGPTAPI app once per config (None: unprotected)."""

    def __init__(self, tmp: Path, specs: list[dict[str, Any] | None]) -> None:
        script = tmp / "serve_exo.py"
        script.write_text(SERVE_EXO)
        env = {**os.environ, "EXO_HOME": str(tmp / "exo-home"), "EXO_RKLLM_AUTOLOAD": "0",
               "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([str(EXO_PYTHON), str(script), json.dumps(specs)], cwd=tmp, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        deadline = time.monotonic() + 120
        while True:
            line = self._line(deadline)
            if line is None:
                self.stop()
                raise RuntimeError("exo's app did not start:\n" + "".join(self.output))
            if line.startswith("PORTS "):
                self.ports = json.loads(line[len("PORTS "):])
                return

    def _line(self, deadline: float) -> str | None:
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    return None
                self.output.append(line)
                return line
            if self.proc.poll() is not None:
                return None
        return None

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


EXO_SPECS = [{"admin_routes": True}, {"cors_origins": APP}, {"cors_origins": "*"}, {"api_key": KEY}]


@pytest.fixture(scope="module")
def exo_apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExoApps]:
    apps = ExoApps(tmp_path_factory.mktemp("exo-security"), EXO_SPECS)
    yield apps
    apps.stop()


@pytest.mark.real_exo
@requires_exo
async def test_real_exo_unprotected_app_is_stopped_by_any_web_page(tmp_path: Path) -> None:
    """The attack, for real: exo's own app answers a foreign page's simple POST /quit by stopping."""
    apps = ExoApps(tmp_path, [None])
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(apps.url(0) + "/quit", headers={"Origin": EVIL, **SIMPLE_POST}, data="x") as resp:
                assert resp.status == 200
                assert resp.headers["Access-Control-Allow-Origin"] == EVIL  # and the page may even read it
        apps.proc.wait(timeout=BOUND)  # the process ends
    finally:
        apps.stop()


@pytest.mark.real_exo
@requires_exo
async def test_real_exo_refuses_a_foreign_page_and_serves_allowed_ones(exo_apps: ExoApps) -> None:
    origin_only, listed, anyone, keyed = (exo_apps.url(i) for i in range(4))
    async with aiohttp.ClientSession() as session:
        # The same POST /quit, admin routes on: refused by the origin check, the node keeps running.
        async with session.post(origin_only + "/quit", headers={"Origin": EVIL, **SIMPLE_POST}, data="x") as resp:
            await _assert_openai_error(resp, 403)
            assert _cors_headers(resp) == {}  # aiohttp_cors's reflected headers were stripped
        async with session.get(origin_only + "/healthcheck") as resp:
            assert resp.status == 200
        assert exo_apps.proc.poll() is None
        # The page exo serves itself still works.
        async with session.get(origin_only + "/v1/models", headers={"Origin": origin_only}) as resp:
            assert resp.status == 200  # aiohttp_cors's assertion did not fire
            assert resp.headers["Access-Control-Allow-Origin"] == origin_only
        # A listed origin: aiohttp_cors's headers, made right; a preflight answered by us for every route.
        async with session.get(listed + "/v1/models", headers={"Origin": APP}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == APP
            assert resp.headers["Access-Control-Allow-Credentials"] == "true"
            assert "origin" in _vary(resp)
        async with session.options(listed + "/v1/chat/completions", headers={
                "Origin": APP, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"}) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == APP
            assert {"authorization", "content-type"} <= {
                h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
        async with session.get(listed + "/v1/models", headers={"Origin": EVIL}) as resp:
            await _assert_openai_error(resp, 403)
            assert _cors_headers(resp) == {}
        # `*`: any origin may read, but never with credentials (exo's aiohttp_cors sends them).
        async with session.get(anyone + "/v1/models", headers={"Origin": EVIL}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == EVIL
            assert "Access-Control-Allow-Credentials" not in resp.headers
        # Admin routes are off unless enabled: exo's /quit handler does not run.
        async with session.post(listed + "/quit") as resp:
            assert "RKLLM_ADMIN_ROUTES=1" in (await _assert_openai_error(resp, 403))["message"]
        assert exo_apps.proc.poll() is None


@pytest.mark.real_exo
@requires_exo
async def test_real_exo_api_key_and_json_errors(exo_apps: ExoApps) -> None:
    keyed, plain = exo_apps.url(3), exo_apps.url(1)
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/models", "/models", "/topology", "/initial_models"):
            async with session.get(keyed + path) as resp:
                await _assert_openai_error(resp, 401)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        async with session.get(keyed + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status == 200 and (await resp.json())["object"] == "list"
        for path in ("/", "/index.html", "/index.js", "/healthcheck"):  # tinychat loads without the key
            async with session.get(keyed + path) as resp:
                assert resp.status == 200, path
        # exo's static folder at `/` would answer an unknown POST under /v1/ with "405 Allow: GET, HEAD".
        async with session.post(plain + "/v1/nope", json={}) as resp:
            assert (await _assert_openai_error(resp, 404))["code"] == "not_found"
        async with session.get(plain + "/v1/nope") as resp:
            assert (await _assert_openai_error(resp, 404))["code"] == "not_found"
        async with session.delete(plain + "/v1/models") as resp:
            assert (await _assert_openai_error(resp, 405))["code"] == "method_not_allowed"
            assert "GET" in resp.headers["Allow"]
