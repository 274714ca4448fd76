"""Model lifecycle through a real, unmodified legacy exo: RKLLM_PRELOAD, the loading state, load/unload routes.

Skipped with the reason when legacy exo is not importable (see tests/real_exo.py). The keep-alive
timer is covered at driver level (tests/test_lifecycle.py); here exo's own start-up, its API
routes and its /v1/models are the subject. Waits are bounded by generous ceilings only.
"""
from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import aiohttp
import pytest

from real_exo import EXO_PYTHON, REAL_EXO, start_exo
from support import DEMO_ID

pytestmark = REAL_EXO
CEILING_S = 60.0
LOAD_MS = 3000


@pytest.fixture(scope="module")
def exo(tmp_path_factory, demo_model_dir):
    workdir = tmp_path_factory.mktemp("exo-lifecycle")
    models = workdir / "models"
    shutil.copytree(demo_model_dir, models / demo_model_dir.name)
    proc = start_exo(EXO_PYTHON, workdir, models,
                     {"RKLLM_PRELOAD": "first", "RKLLM_SIM_LOAD_MS": str(LOAD_MS), "RKLLM_SIM_DECODE_MS": "5",
                      "RKLLM_SIM_PREFILL_MS": "0", "RKLLM_SIM_PREFILL_BASE_MS": "0"},
                     ["--max-generate-tokens", "8"])
    yield proc
    proc.stop()


async def get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as r:
        assert r.status == 200
        return await r.json()


async def until(session: aiohttp.ClientSession, url: str, condition, what: str) -> Any:
    deadline = time.monotonic() + CEILING_S
    while True:
        body = await get(session, url)
        if condition(body):
            return body
        assert time.monotonic() < deadline, f"still waiting for {what}: {body}"
        await asyncio.sleep(0.05)


def demo_row(models: dict[str, Any]) -> dict[str, Any]:
    return next(m for m in models["data"] if m["id"] == DEMO_ID)


async def test_preload_loading_state_and_the_load_unload_routes(exo):
    status_url, models_url = f"{exo.api}/v1/rkllm/status", f"{exo.api}/v1/models"
    async with aiohttp.ClientSession() as session:
        # RKLLM_PRELOAD=first: exo's start-up loads the model, no request needed
        status = await until(session, status_url, lambda b: b.get("loaded_model") == DEMO_ID, "the preload")
        assert status["load"]["status"] == "loaded" and not status["recent"]
        row = demo_row(await get(session, models_url))
        assert row["ready"] is True and row["status"] == "loaded"
        preload_started = status["load"]["elapsed_s"]
        async with session.post(f"{exo.api}/v1/chat/completions",
                                json={"model": DEMO_ID, "messages": [{"role": "user", "content": "hi"}],
                                      "stream": False}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["choices"][0]["message"]["content"]
        # the answer is complete at exo's last token; the scheduler records the run when the runtime
        # reports its end, a moment later
        status = await until(session, status_url, lambda b: b.get("recent"), "the request's record")
        assert status["load"]["elapsed_s"] == preload_started  # the request did not load anything
        assert len(status["recent"]) == 1 and status["recent"][0]["generated"] > 0

        # unload, then a slow explicit load: loading is visible, never `ready`
        async with session.post(f"{exo.api}/v1/rkllm/unload", json={"model": DEMO_ID}) as r:
            body = await r.json()
            assert r.status == 200 and body["loaded_model"] is None and body["status"] == "available", body
        assert demo_row(await get(session, models_url))["status"] == "available"
        load = asyncio.ensure_future(session.post(f"{exo.api}/v1/rkllm/load", json={"model": DEMO_ID}))
        status = await until(session, status_url, lambda b: b["load"]["status"] == "loading"
                             and b["load"]["progress"] > 0, "the load to report progress")
        assert status["load"]["progress_known"] is True and status["load"]["progress"] < 1
        row = demo_row(await get(session, models_url))
        assert row["ready"] is False and row["status"] == "loading"
        r = await asyncio.wait_for(load, CEILING_S)
        body = await r.json()
        assert r.status == 200 and body["status"] == "loaded" and body["load"]["progress"] == 1.0, body
        assert demo_row(await get(session, models_url))["ready"] is True

        async with session.post(f"{exo.api}/v1/rkllm/load", json={"model": "no-such-model"}) as r:
            error = (await r.json())["error"]
            assert r.status == 404 and error["code"] == "model_not_found"
            assert set(error) == {"message", "type", "param", "code"}
    assert "preloading qwen2.5-1.5b-instruct-demo (RKLLM_PRELOAD)" in exo.log_text()
