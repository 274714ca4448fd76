"""The models on disk, as exo model ids.

Layout (rkllama's): `<models_dir>/<Name>/<file>.rkllm` with an optional
`Modelfile` and tokenizer files in the folder, plus loose `<models_dir>/*.rkllm`.
A broken entry is kept with the reason it cannot be served (so the user is told
why, not "unknown model"), and never stops the others from loading. Names are
only ever looked up in the scanned table: a requested name cannot build a path.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from .config import Config
from .errors import ModelNotFound, ModelUnavailable
from .runtime.base import ModelSpec, SamplingParams
from .tokenizer import has_tokenizer_files

log = logging.getLogger("exo_rkllm.catalog")

DEFAULT_CONTEXT = 4096
DEFAULT_LAYERS = 32
_FLOAT_KEYS = {"TEMPERATURE": "temperature", "TOP_P": "top_p", "REPEAT_PENALTY": "repeat_penalty",
               "FREQUENCY_PENALTY": "frequency_penalty", "PRESENCE_PENALTY": "presence_penalty"}
_INT_KEYS = ("TOP_K", "NUM_CTX", "MAX_CONTEXT_LEN", "MAX_NEW_TOKENS", "NUM_PREDICT", "N_LAYERS")
_LINE = re.compile(r'^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$')
_CTX_IN_NAME = re.compile(r"(?:^|[-_.])(\d{1,3})k(?:$|[-_.])", re.I)
_CTX_DIGITS_IN_NAME = re.compile(r"(?:^|[-_.])ctx[-_]?(\d{3,6})(?:$|[-_.])", re.I)


class ModelfileError(ValueError):
    pass


def parse_modelfile(text: str) -> dict[str, str]:
    """rkllama's Modelfile: `KEY="value"` (or KEY=value) lines, `#` comments. Keys are upper-cased."""
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
    for key in _FLOAT_KEYS:
        if key in values and values[key] != "":
            try:
                float(values[key])
            except ValueError:
                raise ModelfileError(f"{key}={values[key]!r} is not a number") from None
    for key in _INT_KEYS:
        if key in values and values[key] != "":
            try:
                int(values[key])
            except ValueError:
                raise ModelfileError(f"{key}={values[key]!r} is not a whole number") from None
    return values


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    return slug or "model"


def context_from_name(name: str) -> int | None:
    m = _CTX_IN_NAME.search(name)
    if m:
        return int(m.group(1)) * 1024
    m = _CTX_DIGITS_IN_NAME.search(name)
    return int(m.group(1)) if m else None


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
    aliases: tuple[str, ...] = ()
    problem: str | None = None  # why it cannot be served; None when it can
    loose: bool = False  # a bare <models_dir>/*.rkllm file rather than a model folder

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def tokenizer_dir(self) -> Path | None:
        src = self.tokenizer_source
        return Path(src) if src and Path(src).is_dir() else None

    @property
    def system_prompt(self) -> str | None:
        return self.modelfile.get("SYSTEM") or None

    def spec(self, config: Config) -> ModelSpec:
        if self.problem or self.model_file is None:
            raise ModelUnavailable(f"model {self.model_id!r} cannot be served: {self.problem}")
        mf = self.modelfile
        sampling = SamplingParams(**{attr: float(mf[key]) for key, attr in _FLOAT_KEYS.items() if mf.get(key)},
                                  **({"top_k": int(mf["TOP_K"])} if mf.get("TOP_K") else {}))
        max_new = config.max_new_tokens or int(mf.get("MAX_NEW_TOKENS") or mf.get("NUM_PREDICT") or 0)
        tok_dir = self.tokenizer_dir
        return ModelSpec(model_id=self.model_id, path=self.model_file, max_context_len=self.context_len,
                         max_new_tokens=max_new if max_new > 0 else self.context_len, sampling=sampling,
                         tokenizer_dir=tok_dir, remote_name=mf.get("RKLLAMA_NAME") or self.name, options=dict(mf))


class Catalog:
    """Scans the models folder; thread-safe; `refresh()` picks up models added while running."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        self._aliases: dict[str, str] = {}
        self._scanned = False

    # -- public ------------------------------------------------------------------------------
    def entries(self) -> list[ModelEntry]:
        self._ensure_scanned()
        return sorted(self._entries.values(), key=lambda e: e.model_id)

    def servable(self) -> list[ModelEntry]:
        return [e for e in self.entries() if e.ok]

    def names(self) -> dict[str, str]:
        """Every accepted name (ids and aliases) -> model id."""
        self._ensure_scanned()
        return {**self._aliases, **{k: k for k in self._entries}}

    def find(self, name: str) -> ModelEntry | None:
        self._ensure_scanned()
        key = self._aliases.get(name, name)
        entry = self._entries.get(key)
        if entry is None:
            key = self._aliases.get(name.lower(), name.lower())
            entry = self._entries.get(key)
        return entry

    def resolve(self, name: str) -> ModelEntry:
        """The servable entry for `name`, or an error that says what is wrong and what exists."""
        entry = self.find(name)
        if entry is None:
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
        if entry.problem:
            raise ModelUnavailable(f"model {entry.model_id!r} cannot be served: {entry.problem}")
        return entry

    def refresh(self) -> list[ModelEntry]:
        entries = list(self._scan())
        with self._lock:
            self._entries = {e.model_id: e for e in entries}
            self._aliases = self._build_aliases(entries)
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
        used: set[str] = set()
        for path in sorted(root.iterdir()):
            if path.name.startswith("."):
                continue
            try:
                if path.is_dir():
                    entry = self._folder_entry(path)
                elif path.suffix == ".rkllm" and path.is_file():
                    entry = self._loose_entry(path)
                else:
                    continue
            except Exception as exc:  # a broken entry must never stop the scan
                entry = ModelEntry(slugify(path.stem if path.is_file() else path.name), path.name, path, None,
                                   problem=f"unreadable: {exc}")
            if entry is None:
                continue
            if entry.model_id in used:
                log.warning("skipping %s: its id %r is already taken by another model", path, entry.model_id)
                continue
            used.add(entry.model_id)
            if entry.problem:
                log.warning("model %s is listed but cannot be served: %s", entry.model_id, entry.problem)
            found.append(entry)
        return found

    def _folder_entry(self, folder: Path) -> ModelEntry | None:
        rkllm_files = sorted(p for p in folder.iterdir() if p.suffix == ".rkllm" and not p.name.startswith("."))
        modelfile_path = folder / "Modelfile"
        if not rkllm_files and not modelfile_path.exists():
            return None  # not a model folder
        model_id = slugify(folder.name)
        problem: str | None = None
        modelfile: dict[str, str] = {}
        if modelfile_path.exists():
            try:
                modelfile = parse_modelfile(modelfile_path.read_text(encoding="utf-8"))
            except (ModelfileError, UnicodeDecodeError) as exc:
                problem = f"broken Modelfile ({modelfile_path}): {exc}"
        model_file: Path | None = None
        if problem is None:
            model_file, problem = self._pick_model_file(folder, rkllm_files, modelfile.get("FROM"))
        tok_source, tok_problem = self._tokenizer_source(folder, modelfile)
        problem = problem or tok_problem
        name_for_ctx = (model_file.name if model_file else "") + " " + folder.name
        return ModelEntry(model_id=model_id, name=folder.name, folder=folder, model_file=model_file,
                          modelfile=modelfile, tokenizer_source=tok_source,
                          context_len=self._context(modelfile, name_for_ctx),
                          n_layers=self._layers(modelfile, folder, tok_source),
                          aliases=tuple(a for a in {folder.name, *(p.stem for p in rkllm_files)} if a != model_id),
                          problem=problem)

    def _loose_entry(self, path: Path) -> ModelEntry:
        tok_source, problem = self._tokenizer_source(path.parent, {}, allow_folder=False)
        return ModelEntry(model_id=slugify(path.stem), name=path.stem, folder=path.parent, model_file=path,
                          tokenizer_source=tok_source, context_len=self._context({}, path.name),
                          n_layers=self._layers({}, None, tok_source), aliases=(path.stem,), problem=problem,
                          loose=True)

    @staticmethod
    def _pick_model_file(folder: Path, files: list[Path], wanted: str | None) -> tuple[Path | None, str | None]:
        if wanted:
            if "/" in wanted or "\\" in wanted or wanted in ("..", "."):
                return None, f"Modelfile FROM={wanted!r} must name a file inside {folder}"
            path = folder / wanted
            if not path.is_file():
                return None, f"Modelfile FROM={wanted!r}: no such file in {folder}"
            return path, None
        if not files:
            return None, f"no .rkllm file in {folder}"
        if len(files) > 1:
            return None, (f"{len(files)} .rkllm files in {folder} and no Modelfile FROM line to choose: "
                          f"add FROM=\"{files[0].name}\"")
        return files[0], None

    def _tokenizer_source(self, folder: Path, modelfile: Mapping[str, str],
                          allow_folder: bool = True) -> tuple[str | None, str | None]:
        if allow_folder and has_tokenizer_files(folder):
            return str(folder), None
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
            return None, (f"missing tokenizer: no tokenizer files in {folder} and {repo!r} is not in the local "
                          "Hugging Face cache; copy tokenizer.json + tokenizer_config.json into the folder, or "
                          "set RKLLM_ALLOW_NETWORK=1 to download it")
        return None, (f"missing tokenizer: put tokenizer.json + tokenizer_config.json in {folder}, add "
                      "HUGGINGFACE_PATH to a Modelfile, or set RKLLM_TOKENIZER_DIR")

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
            return max(1, int(modelfile["N_LAYERS"]))
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

    @staticmethod
    def _build_aliases(entries: list[ModelEntry]) -> dict[str, str]:
        ids = {e.model_id for e in entries}
        seen: dict[str, set[str]] = {}
        for e in entries:
            for alias in e.aliases:
                for form in {alias, alias.lower(), slugify(alias)}:
                    if form not in ids:
                        seen.setdefault(form, set()).add(e.model_id)
        return {alias: next(iter(owners)) for alias, owners in seen.items() if len(owners) == 1}


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
