"""Check, with the real clients, what a person sees: Open WebUI and exo's own web chat (tinychat).

Not part of the pytest suite: it needs Open WebUI (a 7 GB virtualenv), Node with playwright-core
and a system Chromium. It starts a real legacy exo on the simulator (RKLLM_BACKEND=sim, the demo
model, 60 ms per token so streaming is visible), a small recording proxy in front of exo for Open
WebUI (so the exact request Open WebUI sent and the exact stream it got back are kept), and Open
WebUI itself; then it drives headless Chromium through playwright-core (never a downloaded browser:
`executablePath` is the system Chromium) and reads each answer's DOM text while it streams and
when it is done, with a screenshot per case.

Cases (each Open WebUI case in a new chat: the simulator reads its directives from the whole
prompt, so an earlier turn's `[[sim:...]]` would apply to a later answer):
  owui-default-tools  Open WebUI's defaults (built-in tools on): what a 4k-context model gets
  owui-answer         a normal streamed answer        -> the text, no error
  owui-fails          [[sim:tokens=40]] [[sim:error_at=10]] -> the partial text AND an error
  owui-reasoning      <think>...</think> answer      -> a reasoning block, the answer apart
  tinychat-first      first message, no model chosen -> a streamed answer on the served model
  tinychat-fails      a stream failing half-way      -> something other than a finished answer
  tinychat-reasoning  (informational) what tinychat does with reasoning_content
Before owui-answer the demo model's "builtin_tools" capability is turned off (what unticking it
in Admin Settings > Models does), because with Open WebUI's built-in tool list the prompt does
not fit a 4096-token context (see owui-default-tools).

Run (after `python3 -m venv /tmp/owui && /tmp/owui/bin/pip install open-webui`,
`apt-get install chromium`, `cd /tmp/pw && npm install playwright-core`):
  .venv/bin/python benchmarks/ui_check.py [--out /tmp/ui-check] [--skip-owui] [--skip-tinychat]
It prints what each UI showed and a verdict per case, writes report.json, proxy.jsonl, logs and
screenshots under --out, and exits 1 if a case did not look as it should.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from exo_rkllm.bench.exo_process import ExoProcess, ExoUnavailable, free_port, stop_process_group
from exo_rkllm.models.demo import write_demo_model

DEFAULT_EXO_PYTHON = str(Path.home() / ".cache/exo-rkllm/legacy-exo/bin/python")
ANSWER_TEXT = "Hello from the simulated NPU, streamed word by word."
REASONING_PROMPT = "[[sim:text=<think>I should greet.</think>Hello there!]]"
FAILING_PROMPT = "[[sim:tokens=40]] [[sim:error_at=10]] Tell me about the NPU."


class Expect(str, Enum):
    """What a person should see for a case."""

    ANSWER = "answer"  # the streamed text, finished, no error
    PARTIAL_AND_ERROR = "partial+error"  # the text so far and an error, not a finished answer
    REASONING = "reasoning"  # a reasoning block holding the think text, the answer apart
    ERROR = "error"  # an error, no answer
    INFO = "info"  # recorded only


@dataclass(frozen=True)
class Case:
    name: str
    ui: str  # "owui" or "tinychat"
    prompt: str
    expect: Expect
    new_chat: bool = True
    answer: str | None = None  # the exact answer text expected, where known
    reasoning: str | None = None
    recheck_after_s: float = 0.0  # look again this long after the end (tinychat's toast goes away)
    before: str | None = None  # a setup step for the driver to run first
    reload_after: bool = False  # reload the page and read the stored chat again (Open WebUI keeps it)


CASES = [
    Case("owui-default-tools", "owui", f"[[sim:text={ANSWER_TEXT}]] Hi!", Expect.ERROR),
    Case("owui-answer", "owui", f"[[sim:text={ANSWER_TEXT}]] Hi!", Expect.ANSWER, answer=ANSWER_TEXT,
         before="owui_disable_builtin_tools"),
    Case("owui-fails", "owui", FAILING_PROMPT, Expect.PARTIAL_AND_ERROR, reload_after=True),
    Case("owui-reasoning", "owui", REASONING_PROMPT, Expect.REASONING, answer="Hello there!",
         reasoning="I should greet."),
    Case("tinychat-first", "tinychat", f"[[sim:text={ANSWER_TEXT}]] Hi!", Expect.ANSWER, answer=ANSWER_TEXT),
    # Same conversation: the first turn's text directive applies too, so the partial text is readable.
    Case("tinychat-fails", "tinychat", FAILING_PROMPT, Expect.PARTIAL_AND_ERROR, new_chat=False,
         recheck_after_s=31.0),
    Case("tinychat-reasoning", "tinychat", REASONING_PROMPT, Expect.INFO),
]


# -- the recording proxy ---------------------------------------------------------------------------
@dataclass
class Exchange:
    """One request through the proxy and the whole answer it got, as bytes went by."""

    t: float
    method: str
    path: str
    request: str
    status: int
    response: str


@dataclass
class RecordingProxy:
    """Forwards everything to exo unchanged, streaming, and keeps each request and answer: the
    proof of what Open WebUI's backend really sent and got back."""

    upstream: str
    log_path: Path
    port: int = 0
    exchanges: list[Exchange] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900), auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        self.port = self.port or free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return f"http://127.0.0.1:{self.port}"

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        keep = ("content-type", "authorization", "accept")
        headers = {k: v for k, v in request.headers.items() if k.lower() in keep}
        t0 = time.time()
        async with self._session.request(request.method, self.upstream + request.path_qs, data=body,
                                         headers=headers) as up:
            out = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() in ("content-type", "cache-control")})
            await out.prepare(request)
            got = bytearray()
            async for piece in up.content.iter_any():
                got += piece
                await out.write(piece)
            await out.write_eof()
        ex = Exchange(t0, request.method, request.path_qs, body.decode("utf-8", "replace"), up.status,
                      got.decode("utf-8", "replace"))
        self.exchanges.append(ex)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(ex)) + "\n")
        return out

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


@dataclass(frozen=True)
class StreamSummary:
    """What an OpenAI chat answer (streamed or not) carried, read from its raw text."""

    status: int
    content: str
    reasoning: str
    finish_reason: str | None
    error: str | None
    chunks: int

    @classmethod
    def read(cls, status: int, raw: str) -> "StreamSummary":
        content, reasoning, finish, error, chunks = [], [], None, None, 0
        if not raw.lstrip().startswith("data:"):
            try:
                body = json.loads(raw)
            except ValueError:
                return cls(status, "", "", None, raw[:300] or None, 0)
            err = body.get("error") if isinstance(body, dict) else None
            msg = ((body.get("choices") or [{}])[0].get("message") or {}) if isinstance(body, dict) else {}
            return cls(status, msg.get("content") or "", msg.get("reasoning_content") or "",
                       None, (err or {}).get("message") if isinstance(err, dict) else err, 0)
        for line in raw.splitlines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunks += 1
            data = json.loads(line[5:])
            if data.get("error"):
                error = data["error"].get("message") if isinstance(data["error"], dict) else str(data["error"])
            for choice in data.get("choices") or []:
                delta = choice.get("delta") or {}
                content.append(delta.get("content") or "")
                reasoning.append(delta.get("reasoning_content") or "")
                finish = choice.get("finish_reason") or finish
        return cls(status, "".join(content), "".join(reasoning), finish, error, chunks)


# -- Open WebUI ------------------------------------------------------------------------------------
@dataclass
class OpenWebUI:
    binary: Path
    api_base: str
    work: Path
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 900.0) -> str:
        self.port = self.port or free_port()
        data = self.work / "owui-data"
        shutil.rmtree(data, ignore_errors=True)  # fresh: Open WebUI keeps env settings in its database
        data.mkdir(parents=True)
        env = {**os.environ, "DATA_DIR": str(data), "OFFLINE_MODE": "True", "HF_HUB_OFFLINE": "1",
               "WEBUI_AUTH": "False", "ENABLE_OLLAMA_API": "False", "OPENAI_API_BASE_URL": self.api_base,
               "OPENAI_API_KEY": "x", "ENABLE_TITLE_GENERATION": "False", "ENABLE_TAGS_GENERATION": "False",
               "ENABLE_FOLLOW_UP_GENERATION": "False", "WEBUI_SECRET_KEY": "ui-check-only"}
        log = open(self.work / "owui.log", "wb")
        self.proc = subprocess.Popen([str(self.binary), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                                     env=env, cwd=str(self.work), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"Open WebUI exited with {self.proc.returncode}; see {self.work / 'owui.log'}")
                try:
                    async with s.get(f"{self.url}/health") as r:
                        if r.status == 200:
                            return self.url
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    pass
                await asyncio.sleep(2)
        raise RuntimeError(f"Open WebUI did not answer /health within {timeout_s:.0f} s")

    async def stop(self) -> None:
        await stop_process_group(self.proc)


# -- the browser driver (Node + playwright-core, the system Chromium) -------------------------------
DRIVER_JS = r"""
const { chromium } = require('playwright-core');
const fs = require('fs');
const plan = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const sleep = ms => new Promise(r => setTimeout(r, ms));
const norm = s => (s || '').replace(/\s+/g, ' ').trim();

async function owuiRead(page) {
  return await page.evaluate(() => {
    const norm = s => (s || '').replace(/\s+/g, ' ').trim();
    const boxes = [...document.querySelectorAll('#response-content-container')];
    const c = boxes[boxes.length - 1];
    const toasts = [...document.querySelectorAll('[data-sonner-toast]')].map(t => norm(t.innerText)).filter(Boolean);
    if (!c) return { content: '', error_box: '', reasoning_label: '', reasoning_text: '', toasts, done: false };
    const toggles = [...c.querySelectorAll('button[aria-expanded]')];
    const blocks = toggles.map(b => b.parentElement);
    const inBlock = e => blocks.some(b => b.contains(e));
    const content = [...c.querySelectorAll('.markdown-prose')].filter(e => !inBlock(e)).map(e => e.innerText).join('\n');
    const errorBox = [...c.children].filter(e => e.matches('div.rounded-2xl')).map(e => e.innerText).join('\n');
    const msg = c.closest('[id^="message-"]');
    const done = !!(msg && msg.querySelector('button[aria-label="Regenerate"]'));
    return { content: norm(content), error_box: norm(errorBox), toasts, done,
             reasoning_label: norm(toggles.map(b => b.innerText).join(' | ')),
             reasoning_text: norm(blocks.map(b => b.innerText).join(' | ')) };
  });
}

async function tinyRead(page) {
  return await page.evaluate(() => {
    const norm = s => (s || '').replace(/\s+/g, ' ').trim();
    const st = Alpine.$data(document.querySelector('[x-data]'));
    const bubbles = [...document.querySelectorAll('.messages .message-role-assistant')];
    const toast = document.querySelector('.toast');
    const visible = !!toast && getComputedStyle(toast).display !== 'none';
    return { content: bubbles.length ? norm(bubbles[bubbles.length - 1].innerText) : '', bubbles: bubbles.length,
             toasts: visible ? [norm(toast.querySelector('.toast-error-message')?.innerText)] : [],
             generating: st.generating, selected_model: st.cstate.selectedModel, error_box: '',
             reasoning_label: '', reasoning_text: '',
             histories: JSON.parse(localStorage.getItem('histories') || '[]').length };
  });
}

async function owuiOpen(page, base, model) {
  await page.goto(base + '/', { waitUntil: 'load' });
  await page.waitForSelector('#chat-input', { timeout: 60000 });
  await sleep(1500);
  const ok = page.getByRole('button', { name: "Okay, Let's Go!" });
  if (await ok.count()) { await ok.click(); await sleep(300); }
  await page.click('#model-selector-model-button');
  await page.click(`button[aria-label="Select ${model} model"]`, { timeout: 10000 });
  await sleep(300);
  return await page.getAttribute('#model-selector-model-button', 'aria-label');
}

async function owuiDisableBuiltinTools(page, model) {
  // What Admin Settings > Models > (model) > Capabilities > "Builtin Tools" off saves.
  return await page.evaluate(async (model) => {
    const auth = { 'Content-Type': 'application/json', Authorization: 'Bearer ' + localStorage.token };
    const form = { id: model, base_model_id: null, name: model, meta: { capabilities: { builtin_tools: false } }, params: {} };
    let r = await fetch('/api/v1/models/create', { method: 'POST', headers: auth, body: JSON.stringify(form) });
    if (!r.ok) r = await fetch('/api/v1/models/model/update?id=' + encodeURIComponent(model), { method: 'POST', headers: auth, body: JSON.stringify(form) });
    return r.status;
  }, model);
}

async function runCase(page, ui, c, plan, net) {
  const out = { name: c.name, samples: [], notes: [], requests: [] };
  const read = ui === 'owui' ? owuiRead : tinyRead;
  if (c.before === 'owui_disable_builtin_tools') out.notes.push('builtin_tools off: HTTP ' + await owuiDisableBuiltinTools(page, plan.model));
  if (ui === 'owui' && c.new_chat) out.notes.push('model picked: ' + await owuiOpen(page, plan.owui_url, plan.model));
  if (ui === 'tinychat' && c.new_chat) {
    await page.goto(plan.exo_url + '/', { waitUntil: 'load' });
    await page.waitForSelector('#input-form');
    await sleep(2000);  // initial_models and the model poll settle
    out.notes.push('model shown before sending: ' + (await tinyRead(page)).selected_model);
  }
  const netStart = net.length;
  const t0 = Date.now();
  if (ui === 'owui') {
    await page.click('#chat-input');
    await page.keyboard.type(c.prompt);
    await page.keyboard.press('Enter');
  } else {
    await page.fill('#input-form', c.prompt);
    await page.press('#input-form', 'Enter');
  }
  let last = null, started = false, seen;
  while (Date.now() - t0 < 90000) {
    await sleep(100);
    seen = await read(page);
    const key = seen.content + ' || ' + seen.error_box + ' || ' + seen.reasoning_label + ' || ' + seen.toasts.join(' / ');
    if (key !== last) { out.samples.push({ ms: Date.now() - t0, content: seen.content, error_box: seen.error_box, reasoning_label: seen.reasoning_label, toasts: seen.toasts }); last = key; }
    if (ui === 'owui' && seen.done) break;
    if (ui === 'tinychat') { if (seen.generating) started = true; else if (started || Date.now() - t0 > 3000) break; }
  }
  await sleep(800);  // let the last render and any toast settle
  if (ui === 'owui') {
    const toggle = await page.$$('#response-content-container >> nth=-1 >> button[aria-expanded="false"]');
    for (const t of toggle) { await t.click(); await sleep(400); }
  }
  out.final = await read(page);
  out.final.ms = Date.now() - t0;
  out.screenshot = `${plan.out}/${c.name}.png`;
  await page.screenshot({ path: out.screenshot, fullPage: false });
  if (c.recheck_after_s) {
    await sleep(c.recheck_after_s * 1000);
    out.later = await read(page);
    out.later.after_s = c.recheck_after_s;
    out.later_screenshot = `${plan.out}/${c.name}-later.png`;
    await page.screenshot({ path: out.later_screenshot });
  }
  if (c.reload_after) {
    await page.reload({ waitUntil: 'load' });
    await page.waitForSelector('#response-content-container', { timeout: 60000 });
    await sleep(2000);
    out.reloaded = await read(page);
    out.reloaded_screenshot = `${plan.out}/${c.name}-reloaded.png`;
    await page.screenshot({ path: out.reloaded_screenshot });
  }
  await sleep(300);
  out.requests = net.slice(netStart);
  out.started_at = t0 / 1000;
  out.ended_at = Date.now() / 1000;
  return out;
}

(async () => {
  const browser = await chromium.launch({ executablePath: plan.chromium, args: ['--no-sandbox'] });
  const results = [];
  try {
    for (const ui of ['owui', 'tinychat']) {
      const cases = plan.cases.filter(c => c.ui === ui);
      if (!cases.length) continue;
      const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
      const page = await context.newPage();
      const net = [];  // the browser's own chat requests (tinychat talks to exo directly)
      page.on('pageerror', e => results.push({ name: ui + '-pageerror', error: e.message }));
      page.on('response', async r => {
        if (!r.url().includes('/v1/chat/completions')) return;
        const entry = { url: r.url(), request: r.request().postData(), status: r.status(), response: null };
        net.push(entry);
        try { entry.response = await r.text(); } catch (e) { entry.response = 'unreadable: ' + e.message; }
      });
      for (const c of cases) {
        try { results.push(await runCase(page, ui, c, plan, net)); }
        catch (e) { results.push({ name: c.name, driver_error: String(e && e.stack || e) }); }
      }
      await context.close();
    }
  } finally {
    await browser.close();
    fs.writeFileSync(plan.results, JSON.stringify(results, null, 1));
  }
})();
"""


@dataclass(frozen=True)
class Verdict:
    ok: bool | None  # None: informational only
    why: str


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


def _streamed(samples: list[dict]) -> int:
    """How many different non-empty texts the answer showed before its last one: more than one
    means a person watched it grow rather than appear whole."""
    texts = [s["content"] for s in samples if s.get("content")]
    return len(set(texts[:-1])) if texts else 0


def judge(case: Case, seen: dict, sent: StreamSummary | None) -> Verdict:
    final = seen.get("final") or {}
    content, error_box, toasts = final.get("content", ""), final.get("error_box", ""), final.get("toasts", [])
    error_shown = bool(error_box or toasts)
    if "driver_error" in seen:
        return Verdict(False, "driver failed: " + seen["driver_error"].splitlines()[0])
    if case.expect is Expect.INFO:
        return Verdict(None, "recorded only")
    if case.expect is Expect.ERROR:
        ok = error_shown and not content
        return Verdict(ok, "an error and no answer" if ok else "expected an error and no answer")
    if case.expect is Expect.ANSWER:
        problems = []
        if _norm(content) != _norm(case.answer or ""):
            problems.append(f"text {content!r} != {case.answer!r}")
        if error_shown:
            problems.append(f"an error is shown: {error_box or toasts}")
        if _streamed(seen.get("samples", [])) < 2:
            problems.append("the text did not visibly grow while streaming")
        if case.ui == "tinychat" and sent is not None and sent.status != 200:
            problems.append(f"the request got HTTP {sent.status}")
        return Verdict(not problems, "; ".join(problems) or "streamed, finished, no error")
    if case.expect is Expect.PARTIAL_AND_ERROR:
        problems = []
        if not content:
            problems.append("no partial text shown")
        if sent is not None and _norm(content) != _norm(sent.content):
            problems.append(f"shown text {content!r} != the streamed text {sent.content!r}")
        if not error_shown:
            problems.append("NO error shown: it looks like a finished (shorter) answer")
        if sent is not None and not sent.error:
            problems.append("the stream carried no error chunk")
        later = seen.get("later")
        note = ""
        if later is not None and not (later.get("error_box") or later.get("toasts")):
            note = f" (after {later.get('after_s')} s the error is gone: only the partial text remains)"
        reloaded = seen.get("reloaded")
        if reloaded is not None:
            kept = bool(reloaded.get("error_box")) and _norm(reloaded.get("content", "")) == _norm(content)
            note += " (after a reload: " + ("the same partial text and error" if kept else
                                            f"text {reloaded.get('content')!r}, error {reloaded.get('error_box')!r}") + ")"
        return Verdict(not problems, ("; ".join(problems) or "partial text and an error") + note)
    if case.expect is Expect.REASONING:
        problems = []
        if not final.get("reasoning_label"):
            problems.append("no reasoning block")
        if (case.reasoning or "") not in final.get("reasoning_text", ""):
            problems.append(f"reasoning block lacks {case.reasoning!r}")
        if _norm(content) != _norm(case.answer or ""):
            problems.append(f"answer {content!r} != {case.answer!r}")
        if "<think>" in content or (case.reasoning or "\0") in content:
            problems.append("the think text is in the answer")
        if error_shown:
            problems.append(f"an error is shown: {error_box or toasts}")
        return Verdict(not problems, "; ".join(problems) or "reasoning shown as reasoning, answer apart")
    return Verdict(None, "?")


def chat_exchanges(seen: dict, case: Case, proxy: RecordingProxy) -> list[dict]:
    """The chat requests behind one case: Open WebUI's backend's, from the proxy, by time (from
    sending the message to the end of the case); tinychat's, as its page sent them."""
    if case.ui == "owui":
        lo, hi = seen.get("started_at", 0) - 1.0, seen.get("ended_at", 0) + 1.0
        return [{"request": ex.request, "status": ex.status, "response": ex.response} for ex in proxy.exchanges
                if ex.path.startswith("/v1/chat/completions") and lo <= ex.t <= hi]
    return [{"request": r.get("request") or "", "status": r.get("status"), "response": r.get("response") or ""}
            for r in seen.get("requests", [])]


def describe_request(raw: str) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        return {"raw": raw[:300]}
    return {"model": body.get("model"), "stream": body.get("stream"),
            "messages": [{"role": m.get("role"), "content": str(m.get("content"))[:120]} for m in body.get("messages", [])],
            "tools": [t.get("function", {}).get("name") for t in body.get("tools") or []],
            "other_fields": sorted(k for k in body if k not in ("model", "stream", "messages", "tools"))}


async def served_model(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/models") as r:
        return (await r.json())["data"][0]["id"]


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exo-python", default=DEFAULT_EXO_PYTHON)
    p.add_argument("--open-webui", default="/tmp/owui/bin/open-webui")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--node-modules", default="/tmp/pw/node_modules", help="where playwright-core is installed")
    p.add_argument("--out", default=None, help="folder for the report, logs and screenshots (default: a new /tmp one)")
    p.add_argument("--decode-ms", default="60")
    p.add_argument("--skip-owui", action="store_true")
    p.add_argument("--skip-tinychat", action="store_true")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ui-check-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cases = [c for c in CASES if not (args.skip_owui and c.ui == "owui") and not (args.skip_tinychat and c.ui == "tinychat")]
    for need, what in ((args.chromium, "chromium (apt-get install chromium)"),
                       (str(Path(args.node_modules) / "playwright-core"), "playwright-core (npm install playwright-core)")):
        if not Path(need).exists():
            print(f"missing {what}: {need}", file=sys.stderr)
            return 2
    if any(c.ui == "owui" for c in cases) and not Path(args.open_webui).exists():
        print(f"missing Open WebUI at {args.open_webui} (or use --skip-owui)", file=sys.stderr)
        return 2

    models = out / "models"
    write_demo_model(models, force=True)
    exo = ExoProcess(args.exo_python, {"RKLLM_BACKEND": "sim", "RKLLM_MODELS_DIR": str(models),
                                       "RKLLM_SIM_DECODE_MS": args.decode_ms}, out / "exo.log")
    proxy = RecordingProxy("", out / "proxy.jsonl")
    owui: OpenWebUI | None = None
    try:
        try:
            exo_url = await exo.start()
        except ExoUnavailable as exc:
            print(f"exo could not start: {exc}", file=sys.stderr)
            return 2
        model = await served_model(exo_url)
        print(f"exo {exo_url} serving {model} (sim, {args.decode_ms} ms/token)")
        proxy.upstream = exo_url
        (out / "proxy.jsonl").write_text("")
        proxy_url = await proxy.start()
        plan: dict[str, Any] = {"chromium": args.chromium, "exo_url": exo_url, "model": model, "out": str(out),
                                "results": str(out / "driver-results.json"),
                                "cases": [{**asdict(c), "expect": c.expect.value} for c in cases]}
        if any(c.ui == "owui" for c in cases):
            owui = OpenWebUI(Path(args.open_webui), f"{proxy_url}/v1", out)
            t0 = time.monotonic()
            plan["owui_url"] = await owui.start()
            print(f"Open WebUI {plan['owui_url']} (up in {time.monotonic() - t0:.0f} s), via proxy {proxy_url}")
        (out / "plan.json").write_text(json.dumps(plan, indent=1))
        (out / "driver.js").write_text(DRIVER_JS)
        env = {**os.environ, "NODE_PATH": args.node_modules}
        run = await asyncio.create_subprocess_exec("node", str(out / "driver.js"), str(out / "plan.json"), env=env)
        await run.wait()
        results = json.loads((out / "driver-results.json").read_text()) if (out / "driver-results.json").exists() else []
    finally:
        if owui is not None:
            await owui.stop()
        await proxy.stop()
        await exo.stop()

    by_name = {r.get("name"): r for r in results}
    report, failed = [], 0
    for case in cases:
        seen = by_name.get(case.name, {"driver_error": "no result"})
        exchanges = chat_exchanges(seen, case, proxy)
        sent = StreamSummary.read(exchanges[-1]["status"], exchanges[-1]["response"]) if exchanges else None
        verdict = judge(case, seen, sent)
        failed += verdict.ok is False
        entry = {"case": case.name, "ui": case.ui, "prompt": case.prompt, "expect": case.expect.value,
                 "verdict": verdict.ok, "why": verdict.why, "notes": seen.get("notes", []),
                 "final": seen.get("final"), "later": seen.get("later"), "reloaded": seen.get("reloaded"),
                 "samples": [f"{s['ms']} ms: {s['content'][:80]!r}"
                             + (f" reasoning={s['reasoning_label']!r}" if s.get("reasoning_label") else "")
                             + (f" err={s['error_box'] or s['toasts']}" if (s.get('error_box') or s.get('toasts')) else "")
                             for s in seen.get("samples", [])],
                 "screenshot": seen.get("screenshot"),
                 "request": describe_request(exchanges[-1]["request"]) if exchanges else None,
                 "got": asdict(sent) if sent else None}
        report.append(entry)
        mark = {True: "OK  ", False: "FAIL", None: "info"}[verdict.ok]
        final = seen.get("final") or {}
        print(f"\n[{mark}] {case.name}: {verdict.why}")
        print(f"  sent: {case.prompt!r}")
        print(f"  bubble: {final.get('content', '')!r}")
        if final.get("reasoning_label"):
            print(f"  reasoning block: {final.get('reasoning_label')!r} -> {final.get('reasoning_text')!r}")
        if final.get("error_box") or final.get("toasts"):
            print(f"  error shown: {final.get('error_box') or final.get('toasts')}")
        if seen.get("later") is not None:
            later = seen["later"]
            print(f"  {later.get('after_s')} s later: bubble {later.get('content')!r}, "
                  f"error {later.get('error_box') or later.get('toasts') or 'none'}")
        if seen.get("reloaded") is not None:
            rel = seen["reloaded"]
            print(f"  after a reload: bubble {rel.get('content')!r}, error {rel.get('error_box') or rel.get('toasts') or 'none'}")
        if "histories" in final:
            print(f"  tinychat's saved conversations (localStorage histories): {final['histories']}")
        print(f"  while streaming: {len(entry['samples'])} different states; notes: {entry['notes']}")
        for sample in entry["samples"]:
            print(f"    {sample[:160]}")
        if sent:
            req = entry["request"] or {}
            print(f"  request: model={req.get('model')} stream={req.get('stream')} messages={len(req.get('messages', []))} "
                  f"tools={len(req.get('tools', []))}")
            print(f"  got: HTTP {sent.status}, {sent.chunks} chunks, content={sent.content[:80]!r}, "
                  f"reasoning={sent.reasoning[:40]!r}, finish={sent.finish_reason}, error={sent.error!r}")
    for r in results:
        if r.get("name", "").endswith("-pageerror"):
            print(f"\n(page error in {r['name']}: {r['error'][:200]})")
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(f"\nreport: {out / 'report.json'}; screenshots, proxy.jsonl, exo.log, owui.log in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
