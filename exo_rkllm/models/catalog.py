"""The models on disk, as exo model ids.

Layout (rkllama's): `<models_dir>/<Name>/<file>.rkllm` with an optional
`Modelfile` and tokenizer files in the folder (or in its `tokenizer/`
subfolder, where rkllama 0.0.74 saves them), plus loose `<models_dir>/*.rkllm`.
A broken entry is kept with the reason it cannot be served (so the user is told
why, not "unknown model"), and never stops the others from loading. Names are
only ever looked up in the scanned table: a requested name cannot build a path.

A folder whose only problem is that its .rkllm file is not here (its Modelfile and
tokenizer files are) is *route-only* (`ModelEntry.routable`): it cannot run on this
board, but this node's API can template and tokenize requests for it and hand them
to a board of the ring that has the file (docs/models.md, "Boards with different models").

What can be known without loading a model is checked at scan time (Modelfile
values, the model file's type, size and known headers); what only the runtime
can tell is recorded when it refuses the file (`Catalog.refuse`), so the entry
is listed as broken, with the runtime's reason, until its files change.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from exo_rkllm.config import Config, parse_bool
from exo_rkllm.errors import ModelLoadError, ModelNotFound, ModelUnavailable
from exo_rkllm.runtime.base import ModelSpec, SamplingParams
from exo_rkllm.runtime.sim import SIM_MAGIC, read_sim_model
from exo_rkllm.models.tokenizer import TOKENIZER_FILES, has_tokenizer_files

log = logging.getLogger("exo_rkllm.models.catalog")

DEFAULT_CONTEXT = 4096
DEFAULT_LAYERS = 32
TOKENIZER_SUBFOLDER = "tokenizer"  # rkllama 0.0.74 saves a model's tokenizer in <folder>/tokenizer/
# No converted model is anywhere near this small (the smallest weigh hundreds of MB); only the
# test doubles' model files, recognised by their headers, are smaller.
MIN_MODEL_BYTES = 1 << 20
FAKE_MODEL_MAGIC = b"RKLLM-FAKE-MODEL 1"  # the first line tests/fake_rkllm/fake_rkllm.c checks
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"

_FLOAT_KEYS = {"TEMPERATURE": "temperature", "TOP_P": "top_p", "REPEAT_PENALTY": "repeat_penalty",
               "FREQUENCY_PENALTY": "frequency_penalty", "PRESENCE_PENALTY": "presence_penalty"}
_BOOL_KEYS = ("SKIP_SPECIAL_TOKEN", "EMBED_FLASH", "ENABLE_THINKING")
_LINE = re.compile(r'^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$')
_CTX_IN_NAME = re.compile(r"(?:^|[-_.])(\d{1,3})k(?:$|[-_.])", re.I)
_CTX_DIGITS_IN_NAME = re.compile(r"(?:^|[-_.])ctx[-_]?(\d{3,6})(?:$|[-_.])", re.I)


class ModelfileError(ValueError):
    pass


@dataclass(frozen=True)
class _Number:
    """What a numeric Modelfile value may be; anything else makes the Modelfile broken."""

    whole: bool
    low: float | None = None
    high: float | None = None
    low_excluded: bool = False
    hint: str = ""

    def problem(self, key: str, raw: str) -> str | None:
        try:
            value = float(raw)
        except ValueError:
            return f"{key}={raw!r} is not a {'whole number' if self.whole else 'number'}"
        if not math.isfinite(value):
            return f"{key}={raw!r} is not a finite number"
        if self.whole and not value.is_integer():
            return f"{key}={raw!r} is not a whole number"
        too_low = self.low is not None and (value <= self.low if self.low_excluded else value < self.low)
        too_high = self.high is not None and value > self.high
        if not (too_low or too_high):
            return None
        if self.low is not None and self.high is not None:
            bounds = f"between {_fmt(self.low)} and {_fmt(self.high)}"
        else:
            bounds = f"{'above' if self.low_excluded else 'at least'} {_fmt(self.low)}"
        return f"{key}={raw!r} must be {bounds}" + (f" ({self.hint})" if self.hint else "")


def _fmt(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


# Ranges outside which a value cannot work (or means nothing): checked when the folder is scanned,
# so the model is listed as broken with the reason instead of failing every request.
_NUMBERS: dict[str, _Number] = {
    "NUM_CTX": _Number(True, 1, hint="the context length in tokens the model was converted with"),
    "MAX_CONTEXT_LEN": _Number(True, 1, hint="the context length in tokens the model was converted with"),
    "MAX_NEW_TOKENS": _Number(True, -2, hint="-1 or 0 mean no limit but the context"),
    "NUM_PREDICT": _Number(True, -2, hint="-1 or 0 mean no limit but the context"),
    "TOP_K": _Number(True, 0),
    "N_LAYERS": _Number(True, 1),
    "N_KEEP": _Number(True),
    "BASE_DOMAIN_ID": _Number(True),
    "MIROSTAT": _Number(True, 0, 2, hint="0 off, 1 or 2"),
    "TEMPERATURE": _Number(False, 0),
    "TOP_P": _Number(False, 0, 1),
    "REPEAT_PENALTY": _Number(False, 0, low_excluded=True, hint="1.0 means no penalty"),
    "FREQUENCY_PENALTY": _Number(False),
    "PRESENCE_PENALTY": _Number(False),
    "MIROSTAT_TAU": _Number(False, 0),
    "MIROSTAT_ETA": _Number(False, 0),
}


def parse_modelfile(text: str) -> dict[str, str]:
    """rkllama's Modelfile: `KEY="value"` (or KEY=value) lines, `#` comments. Keys are upper-cased.

    Numeric and boolean values are checked (every bad one is named); whole numbers written
    as decimals (`NUM_CTX=4096.0`, which rkllama accepts) are normalised to `4096`."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise ModelfileError(f"line {number}: expected KEY=\"value\", got {raw.strip()[:60]!r}")
        key, value = m.group(1).upper(), m.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        elif value[:1] in "\"'":
            raise ModelfileError(f"line {number}: unterminated quote in {key}")
        values[key] = value
    problems = []
    for key, rule in _NUMBERS.items():
        raw = values.get(key, "").strip()
        if raw == "":
            continue
        problem = rule.problem(key, raw)
        if problem:
            problems.append(problem)
        elif rule.whole:
            values[key] = str(int(float(raw)))
    for key in _BOOL_KEYS:
        raw = values.get(key, "").strip()
        if raw:
            try:
                parse_bool(raw)
            except ValueError:
                problems.append(f"{key}={raw!r} is not a boolean (true or false)")
    if problems:
        raise ModelfileError("; ".join(problems))
    return values


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    return slug or "model"


def context_from_name(name: str) -> int | None:
    m = _CTX_IN_NAME.search(name)
    if m:
        return int(m.group(1)) * 1024 or None
    m = _CTX_DIGITS_IN_NAME.search(name)
    return int(m.group(1)) or None if m else None


def model_file_problem(path: Path) -> str | None:
    """Why `path` cannot be a model the runtime loads, as far as can be told without loading it.

    Follows links; refuses what is not a readable regular file, an empty file, a Git LFS
    pointer, and anything too small to be a converted model unless it carries the header of
    one of the project's stand-in runtimes (the simulator's is checked as the simulator does).
    The header of real .rkllm files is not documented, so real files are not judged by it:
    the runtime reports what it refuses (see `Catalog.refuse`)."""
    link = f" (a link to {os.readlink(path)})" if path.is_symlink() else ""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path.name}{link} does not exist" if link else f"no such file: {path}"
    except OSError as exc:
        return f"{path.name}{link} cannot be read: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path.name}{link} is {_file_kind(st.st_mode)}, not a model file"
    if st.st_size == 0:
        return f"{path.name}{link} is empty (0 bytes): a failed copy, or a download still in progress?"
    try:
        with open(path, "rb") as fh:
            head = fh.read(256)
    except OSError as exc:
        return f"{path.name}{link} cannot be read: {exc.strerror or exc}"
    if head.startswith(SIM_MAGIC):
        try:
            read_sim_model(path)
        except ModelLoadError as exc:
            return str(exc)
        return None
    if head.startswith(FAKE_MODEL_MAGIC):
        return None
    if head.startswith(_LFS_POINTER):
        return (f"{path.name}{link} is a Git LFS pointer ({st.st_size} bytes), not the model: fetch the file itself "
                "(`git lfs pull` in the clone it came from)")
    if st.st_size < MIN_MODEL_BYTES:
        what = " and looks like a web page" if head.lstrip()[:15].lower().startswith((b"<!doctype", b"<html")) else ""
        size = f"{st.st_size} byte{'s' if st.st_size != 1 else ''}"
        return (f"{path.name}{link} is only {size}{what}: far too small for a converted .rkllm model "
                "(a failed or partial download?)")
    return None


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _stamp(path: Path | None) -> tuple[int, ...] | None:
    """The identity of a file's current content as far as stat tells (links followed)."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class ModelEntry:
    model_id: str
    name: str
    folder: Path
    model_file: Path | None
    modelfile: Mapping[str, str] = field(default_factory=dict)
    tokenizer_source: str | None = None  # a folder, or a hub id (only with RKLLM_ALLOW_NETWORK)
    context_len: int = DEFAULT_CONTEXT
    n_layers: int = DEFAULT_LAYERS
    aliases: tuple[str, ...] = ()  # other names that resolve to this entry (only those that do)
    problem: str | None = None  # why it cannot be served; None when it can
    # Set when the folder has no model file at all (no .rkllm file, or none at the name FROM gives, and
    # no other): the problem that gives. `routable` holds while `problem` is exactly this, nothing more.
    file_absent: str | None = None
    loose: bool = False  # a bare <models_dir>/*.rkllm file rather than a model folder
    file_stamp: tuple[int, ...] | None = None  # the model file's stat identity at scan time
    tokenizer_stamp: tuple[object, ...] = ()  # the same for the tokenizer files
    # What the scan saw on disk (folder, Modelfile, model file, tokenizer folder): when it
    # differs, the entry is scanned again before it is used.
    disk_stamp: tuple[object, ...] = field(default=(), compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def routable(self) -> bool:
        """Whether this node can route the model to a board of the ring that has its file: the folder's
        only problem is that its .rkllm file is not here; its Modelfile and tokenizer are fine. Never a
        loose file (it is the model file), a broken Modelfile, a missing tokenizer, a lost id collision
        or a refusal: each adds a problem of its own."""
        return (self.file_absent is not None and self.problem == self.file_absent and not self.loose
                and self.tokenizer_source is not None)

    def unavailable(self) -> ModelUnavailable:
        """The error for a use of this entry that needs it servable here (the one wording everywhere)."""
        where = (" (this node only routes it: a board of the ring that has its .rkllm file runs it)"
                 if self.routable else "")
        return ModelUnavailable(f"model {self.model_id!r} cannot be served: {self.problem}{where}")

    @property
    def origin(self) -> Path:
        """What on disk this entry is: the folder, or the loose file."""
        return self.model_file if self.loose and self.model_file is not None else self.folder

    @property
    def fingerprint(self) -> tuple[object, ...]:
        """Everything a served model depends on: when it changes, what was built from the entry
        (loaded tokenizer, spec) is stale. The scan's verdict (`problem`) is not part of it."""
        return (self.model_id, self.folder, self.model_file, self.file_stamp, tuple(sorted(self.modelfile.items())),
                self.tokenizer_source, self.tokenizer_stamp, self.context_len, self.n_layers, self.loose)

    @property
    def tokenizer_dir(self) -> Path | None:
        src = self.tokenizer_source
        return Path(src) if src and Path(src).is_dir() else None

    @property
    def system_prompt(self) -> str | None:
        return self.modelfile.get("SYSTEM") or None

    def spec(self, config: Config) -> ModelSpec:
        if self.problem or self.model_file is None:
            raise self.unavailable()
        mf = self.modelfile
        sampling = SamplingParams(**{attr: float(mf[key]) for key, attr in _FLOAT_KEYS.items() if mf.get(key)},
                                  **({"top_k": int(mf["TOP_K"])} if mf.get("TOP_K") else {}))
        max_new = config.max_new_tokens or int(mf.get("MAX_NEW_TOKENS") or mf.get("NUM_PREDICT") or 0)
        tok_dir = self.tokenizer_dir
        return ModelSpec(model_id=self.model_id, path=self.model_file, max_context_len=self.context_len,
                         max_new_tokens=max_new if max_new > 0 else self.context_len, sampling=sampling,
                         tokenizer_dir=tok_dir, remote_name=mf.get("RKLLAMA_NAME") or self.name, options=dict(mf))


class Catalog:
    """Scans the models folder; thread-safe; `refresh()` picks up models added while running.

    Two entries may reduce to one id (`Qwen-Demo/` and `QWEN-DEMO/`). The id then stays with
    the entry that had it before in this process; else with the one whose model file (or
    folder, without one) was modified first; else the first in name order. The other is listed
    as broken, its reason naming the winner, and its own exact names answer with that reason."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = threading.Lock()
        # Every entry by key: an id for the entry serving it, "<id>\0<origin>" for one whose id is taken.
        self._by_key: dict[str, ModelEntry] = {}
        self._aliases: dict[str, str] = {}  # name -> key
        self._refused: dict[str, tuple[tuple[object, ...], str]] = {}  # id -> (fingerprint, reason)
        self._scanned = False

    # -- public ------------------------------------------------------------------------------
    def entries(self) -> list[ModelEntry]:
        """Every entry, broken ones (and ones whose id another entry holds) included."""
        self._ensure_scanned()
        with self._lock:
            every = list(self._by_key.values())
        return sorted(every, key=lambda e: (e.model_id, e.problem is not None, e.name))

    def servable(self) -> list[ModelEntry]:
        return [e for e in self.entries() if e.ok]

    def routable(self) -> list[ModelEntry]:
        """The route-only entries (`ModelEntry.routable`): what this node can route but not run."""
        return [e for e in self.entries() if e.routable]

    def find(self, name: str) -> ModelEntry | None:
        self._ensure_scanned()
        with self._lock:
            return _lookup(self._by_key, self._aliases, name)

    def resolve(self, name: str, *, allow_route_only: bool = False) -> ModelEntry:
        """The servable entry for `name`, or an error that says what is wrong and what exists.
        An entry whose files changed on disk since the scan is scanned again first.
        `allow_route_only`: a route-only entry (`ModelEntry.routable`) is returned too, for what
        needs only its tokenizer and Modelfile (the API of a node that hands the request on)."""
        entry = self.find(name)
        if entry is None or _disk_stamp(entry) != entry.disk_stamp:
            self.refresh()
            entry = self.find(name)
        if entry is None:
            available = ", ".join(e.model_id for e in self.servable())
            if not self.config.models_dir.is_dir():
                raise ModelNotFound(f"unknown model {name!r}: the models folder {self.config.models_dir} does not "
                                    "exist (set RKLLM_MODELS_DIR, or run `exo-rkllm demo` for a simulator model)")
            if not available:
                raise ModelNotFound(f"unknown model {name!r}: {self.config.models_dir} has no servable model "
                                    "(put .rkllm models there, see the README's 'Model layout', set "
                                    "RKLLM_MODELS_DIR, or run `exo-rkllm demo` for a simulator model)")
            raise ModelNotFound(f"unknown model {name!r}; models in {self.config.models_dir}: {available}")
        if entry.problem and not (allow_route_only and entry.routable):
            raise entry.unavailable()
        return entry

    def refuse(self, entry: ModelEntry, reason: str) -> None:
        """`entry` cannot be served for `reason` (the runtime refused its file, its tokenizer would
        not load): list it as broken until a file it is made of changes, or the process restarts."""
        with self._lock:
            self._refused[entry.model_id] = (entry.fingerprint, reason)
            current = self._by_key.get(entry.model_id)
            if current is not None:
                self._by_key[entry.model_id] = self._with_refusal(current)
        log.warning("model %s is listed as broken until its files change: %s", entry.model_id, reason)

    def refresh(self) -> list[ModelEntry]:
        candidates = list(self._scan())
        with self._lock:
            by_key = self._settle(candidates)
            self._refused = {k: v for k, v in self._refused.items() if k in by_key and by_key[k].fingerprint == v[0]}
            by_key = {k: self._with_refusal(e) for k, e in by_key.items()}
            aliases = _build_aliases(by_key)
            # List only the aliases that lead to the entry that lists them.
            self._by_key = {k: dataclasses.replace(e, aliases=tuple(
                a for a in e.aliases if _lookup(by_key, aliases, a) is e)) for k, e in by_key.items()}
            self._aliases = aliases
            self._scanned = True
        return self.entries()

    # -- scanning -----------------------------------------------------------------------------
    def _ensure_scanned(self) -> None:
        if not self._scanned:
            self.refresh()

    def _scan(self) -> Iterable[ModelEntry]:
        root = self.config.models_dir
        if not root.is_dir():
            log.warning("models folder %s does not exist: set RKLLM_MODELS_DIR (or run `exo-rkllm demo`)", root)
            return []
        found: list[ModelEntry] = []
        for path in sorted(root.iterdir()):
            if path.name.startswith("."):
                continue
            try:
                entry = self._folder_entry(path) if path.is_dir() else None
                if entry is None and path.suffix == ".rkllm":
                    entry = self._loose_entry(path)  # also a link to nothing or to a device: say so
            except Exception as exc:  # a broken entry must never stop the scan
                entry = ModelEntry(slugify(path.stem if path.suffix == ".rkllm" else path.name), path.name, path,
                                   None, problem=f"unreadable: {exc}", disk_stamp=_disk_stamp_of(path, None, None))
            if entry is None:
                continue
            if entry.problem:
                log.warning("model %s is listed but cannot be served: %s", entry.model_id, entry.problem)
            found.append(entry)
        return found

    def _settle(self, candidates: list[ModelEntry]) -> dict[str, ModelEntry]:
        """One entry per id (see the class docstring for which); the others marked broken."""
        groups: dict[str, list[ModelEntry]] = {}
        for e in candidates:
            groups.setdefault(e.model_id, []).append(e)
        by_key: dict[str, ModelEntry] = {}
        for model_id, group in groups.items():
            before = self._by_key.get(model_id)
            known = [e for e in group if before is not None and e.origin == before.origin]
            winner = known[0] if known else min(group, key=lambda e: (_first_modified(e), e.origin.name))
            by_key[model_id] = winner
            for e in group:
                if e is winner:
                    continue
                reason = (f"its id {model_id!r} collides with {winner.origin}, which serves that id (ids ignore case "
                          f"and punctuation): rename {e.origin.name} to serve it")
                log.warning("model %s is not served: %s", e.origin, reason)
                by_key[f"{model_id}\0{e.origin}"] = dataclasses.replace(e, problem=reason)
        return by_key

    def _with_refusal(self, entry: ModelEntry) -> ModelEntry:
        """A refused entry's problem says why; a route-only one (its tokenizer would not load) keeps
        its own problem too, and so is no longer routable."""
        refused = self._refused.get(entry.model_id)
        if refused is None or refused[0] != entry.fingerprint or (entry.problem and not entry.routable):
            return entry
        reason = f"{refused[1]} (tried again once its files change, or after a restart)"
        return dataclasses.replace(entry, problem="; ".join(p for p in (entry.problem, reason) if p))

    def _folder_entry(self, folder: Path) -> ModelEntry | None:
        rkllm_files = sorted(p for p in folder.iterdir() if p.suffix == ".rkllm" and not p.name.startswith("."))
        modelfile_path = folder / "Modelfile"
        if not rkllm_files and not modelfile_path.exists() and not self._holds_tokenizer(folder):
            return None  # not a model folder (a tokenizer-only one is: a model this node can route)
        model_id = slugify(folder.name)
        problems: list[str] = []
        modelfile: dict[str, str] = {}
        model_file: Path | None = None
        file_absent: str | None = None
        if modelfile_path.exists():
            try:
                modelfile = parse_modelfile(modelfile_path.read_text(encoding="utf-8"))
            except (ModelfileError, UnicodeDecodeError, OSError) as exc:
                problems.append(f"broken Modelfile ({modelfile_path}): {exc}")
        if not problems:
            model_file, file_problem, absent = self._pick_model_file(folder, rkllm_files, modelfile.get("FROM"))
            if file_problem:
                problems.append(file_problem)
                file_absent = file_problem if absent else None
        tok_source, tok_problem = self._tokenizer_source(folder, modelfile)
        if tok_problem:
            problems.append(tok_problem)
        name_for_ctx = (model_file.name if model_file else "") + " " + folder.name
        return ModelEntry(model_id=model_id, name=folder.name, folder=folder, model_file=model_file,
                          modelfile=modelfile, tokenizer_source=tok_source,
                          context_len=self._context(modelfile, name_for_ctx),
                          n_layers=self._layers(modelfile, folder, tok_source),
                          aliases=tuple(sorted(a for a in {folder.name, *(p.stem for p in rkllm_files)}
                                               if a != model_id)),
                          problem="; ".join(problems) or None, file_absent=file_absent,
                          file_stamp=_stamp(model_file),
                          tokenizer_stamp=_tokenizer_stamp(tok_source),
                          disk_stamp=_disk_stamp_of(folder, model_file, tok_source))

    def _loose_entry(self, path: Path) -> ModelEntry:
        tok_source, tok_problem = self._tokenizer_source(path.parent, {}, allow_folder=False)
        problem = "; ".join(p for p in (model_file_problem(path), tok_problem) if p) or None
        return ModelEntry(model_id=slugify(path.stem), name=path.stem, folder=path.parent, model_file=path,
                          tokenizer_source=tok_source, context_len=self._context({}, path.name),
                          n_layers=self._layers({}, None, tok_source), aliases=(path.stem,), problem=problem,
                          loose=True, file_stamp=_stamp(path), tokenizer_stamp=_tokenizer_stamp(tok_source),
                          disk_stamp=_disk_stamp_of(path.parent, path, tok_source))

    @staticmethod
    def _pick_model_file(folder: Path, files: list[Path],
                         wanted: str | None) -> tuple[Path | None, str | None, bool]:
        """(the model file, why it cannot be used, whether the reason is only that the folder has no
        model file: nothing at FROM's name, not even a dangling link, and no other .rkllm file)."""
        if wanted:
            if "/" in wanted or "\\" in wanted or wanted in ("..", "."):
                return None, f"Modelfile FROM={wanted!r} must name a file inside {folder}", False
            path = folder / wanted
            if not path.exists() and not path.is_symlink():
                return None, f"Modelfile FROM={wanted!r}: no such file in {folder}", not files
            return path, model_file_problem(path), False
        if not files:
            return None, f"no .rkllm file in {folder}", True
        if len(files) > 1:
            return None, (f"{len(files)} .rkllm files in {folder} and no Modelfile FROM line to choose: "
                          f"add FROM=\"{files[0].name}\""), False
        return files[0], model_file_problem(files[0]), False

    def _holds_tokenizer(self, folder: Path) -> bool:
        """Tokenizer files in the folder or its tokenizer/ subfolder, and not RKLLM_TOKENIZER_DIR (a
        tokenizer shared by loose files is not a model)."""
        shared = self.config.tokenizer_dir
        if shared is not None and shared.is_dir() and shared.resolve() == folder.resolve():
            return False
        return _folder_tokenizer(folder) is not None

    def _tokenizer_source(self, folder: Path, modelfile: Mapping[str, str],
                          allow_folder: bool = True) -> tuple[str | None, str | None]:
        local = _folder_tokenizer(folder) if allow_folder else None
        if local is not None:
            return str(local), None
        explicit = modelfile.get("TOKENIZER")
        if explicit:
            path = (folder / explicit).expanduser() if not Path(explicit).expanduser().is_absolute() else Path(explicit).expanduser()
            if path.is_dir() and has_tokenizer_files(path):
                return str(path), None
            return None, f"Modelfile TOKENIZER={explicit!r} is not a folder with tokenizer files"
        if self.config.tokenizer_dir is not None:
            if has_tokenizer_files(self.config.tokenizer_dir):
                return str(self.config.tokenizer_dir), None
            return None, f"RKLLM_TOKENIZER_DIR={self.config.tokenizer_dir} has no tokenizer files"
        repo = modelfile.get("HUGGINGFACE_PATH")
        if repo:
            local = _hub_cache_snapshot(repo)
            if local is not None:
                return str(local), None
            if self.config.allow_network:
                return repo, None
            return None, (f"missing tokenizer: no tokenizer files in {folder} or {folder / TOKENIZER_SUBFOLDER} and "
                          f"{repo!r} is not in the local Hugging Face cache; copy tokenizer.json + "
                          "tokenizer_config.json into the folder, or set RKLLM_ALLOW_NETWORK=1 to download it")
        return None, (f"missing tokenizer: put tokenizer.json + tokenizer_config.json in {folder} (or its "
                      f"{TOKENIZER_SUBFOLDER}/ subfolder), add HUGGINGFACE_PATH to a Modelfile, or set "
                      "RKLLM_TOKENIZER_DIR")

    def _context(self, modelfile: Mapping[str, str], name: str) -> int:
        if self.config.max_context > 0:
            return self.config.max_context
        for key in ("NUM_CTX", "MAX_CONTEXT_LEN"):
            if modelfile.get(key):
                return int(modelfile[key])
        return context_from_name(name) or DEFAULT_CONTEXT

    @staticmethod
    def _layers(modelfile: Mapping[str, str], folder: Path | None, tok_source: str | None) -> int:
        if modelfile.get("N_LAYERS"):
            return int(modelfile["N_LAYERS"])
        for base in (folder, Path(tok_source) if tok_source else None):
            if base is not None and (base / "config.json").is_file():
                try:
                    cfg = json.loads((base / "config.json").read_text())
                    n = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)
                    if n > 0:
                        return n
                except (ValueError, OSError, AttributeError):
                    pass
        return DEFAULT_LAYERS


def _folder_tokenizer(folder: Path) -> Path | None:
    """A model folder's own tokenizer: the folder itself, else its tokenizer/ subfolder (rkllama 0.0.74)."""
    return next((c for c in (folder, folder / TOKENIZER_SUBFOLDER) if c.is_dir() and has_tokenizer_files(c)), None)


def _lookup(by_key: Mapping[str, ModelEntry], aliases: Mapping[str, str], name: str) -> ModelEntry | None:
    """The entry `name` leads to: an alias as written, an id, then the same lower-cased."""
    for form in (name, name.lower()):
        key = aliases.get(form, form)
        if "\0" not in form and key in by_key:
            return by_key[key]
    return None


def _build_aliases(by_key: Mapping[str, ModelEntry]) -> dict[str, str]:
    """Alias forms (as written, lower-cased, slugified) owned by exactly one entry; never an id."""
    ids = {k for k in by_key if "\0" not in k}
    owners: dict[str, set[str]] = {}
    for key, e in by_key.items():
        for alias in e.aliases:
            for form in {alias, alias.lower(), slugify(alias)}:
                if form not in ids:
                    owners.setdefault(form, set()).add(key)
    return {form: next(iter(keys)) for form, keys in owners.items() if len(keys) == 1}


def _first_modified(entry: ModelEntry) -> int:
    """When the entry's model file (or its folder, without one) was last modified: the older stays."""
    for path in (entry.model_file, entry.folder):
        stamp = _stamp(path)
        if stamp is not None:
            return stamp[3]
    return 0


def _tokenizer_stamp(source: str | None) -> tuple[object, ...]:
    if not source or not Path(source).is_dir():
        return ()
    return tuple(_stamp(Path(source) / name) for name in TOKENIZER_FILES)


def _disk_stamp_of(folder: Path, model_file: Path | None, tokenizer_source: str | None) -> tuple[object, ...]:
    """What a change on disk to this entry would alter: its folder (files added, removed, renamed),
    Modelfile, model file, tokenizer subfolder and tokenizer files. A few stat calls."""
    return (_stamp(folder), _stamp(folder / "Modelfile"), _stamp(model_file), _stamp(folder / TOKENIZER_SUBFOLDER),
            _tokenizer_stamp(tokenizer_source))


def _disk_stamp(entry: ModelEntry) -> tuple[object, ...]:
    return _disk_stamp_of(entry.folder, entry.model_file, entry.tokenizer_source)


def _hub_cache_snapshot(repo: str) -> Path | None:
    """The tokenizer of `repo` from the local Hugging Face cache, without touching the network."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo, local_files_only=True,
                                      allow_patterns=["tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json",
                                                      "config.json", "generation_config.json"]))
    except Exception:
        return None
    return path if has_tokenizer_files(path) else None
