"""Several real exo nodes on loopback: the node holding layer 0 runs the model, the others pass tokens
through; every node's API gives the same text as one node. Skipped without legacy exo."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from real_exo import EXO_PYTHON, REAL_EXO, start_ring
from support import DEMO_ID

pytestmark = REAL_EXO
TEXT = " Hé 世界 🤖👩‍💻 ring of nodes 🇫🇷"


async def ask(session, api: str, content: str, stream: bool) -> tuple[str, str]:
    body = {"model": DEMO_ID, "messages": [{"role": "user", "content": content}], "stream": stream}
    async with session.post(f"{api}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        if not stream:
            data = await r.json()
            return data["choices"][0]["message"]["content"], data["choices"][0]["finish_reason"]
        text, finish = "", None
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"]["content"]
                finish = choice["finish_reason"] or finish
                if finish:
                    break
        return text, finish


@pytest.mark.parametrize("n_nodes", [2, 3])
def test_ring_answers_like_one_node_from_every_api(tmp_path, demo_models_dir, n_nodes):
    nodes = start_ring(EXO_PYTHON, tmp_path, demo_models_dir, n_nodes,
                       {"RKLLM_SIM_DECODE_MS": "10", "RKLLM_SIM_LOAD_MS": "100"})
    try:
        async def run():
            async with aiohttp.ClientSession() as s:
                # exo needs a moment after start-up to collect the ring's topology
                deadline = time.monotonic() + 60
                while True:
                    async with s.get(f"{nodes[0].api}/v1/topology") as r:
                        topo = await r.json()
                    if len(topo.get("nodes", {})) == n_nodes or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(1)
                assert len(topo["nodes"]) == n_nodes, topo
                for node in nodes:
                    for stream in (True, False):
                        text, finish = await ask(s, node.api, f"ring [[sim:text={TEXT}]]", stream)
                        assert text == TEXT and finish == "stop"
                generated = await ask(s, nodes[-1].api, "a generated answer", True)
                again = await ask(s, nodes[0].api, "a generated answer", False)
                assert generated == again
                statuses = []
                for node in nodes:
                    async with s.get(f"{node.api}/v1/rkllm/status") as r:
                        statuses.append(await r.json())
                return statuses

        statuses = asyncio.run(run())
        runners = [st for st in statuses if st.get("loaded_model")]
        assert len(runners) == 1, "exactly one node (the one holding layer 0) runs the model"
        assert all(st["plugin"]["active"] == 0 and st["engine"]["contexts"] == 0 for st in statuses)
    finally:
        for node in nodes:
            node.stop()
