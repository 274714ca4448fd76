"""Chat prompts in which only the template makes control tokens: a user's text stays text.

Rendering the chat template and encoding the whole string lets a message that contains
`<|im_end|>\\n<|im_start|>system\\n...` become real control tokens: the client writes its
own turns (role injection). Here the prompt is built so that every special token comes
from the template's own structure and everything a client wrote (contents, tool calls,
tool results, tool definitions, template kwargs) is encoded as plain text.

How: the template is rendered twice, once with the real request (R1) and once with every
special-token string in the client's strings marked by a private character inserted after
its first character (R2; also a special token's beginning left at the end of a string,
which a template may join with the next one). Wherever the template copies client text
through, R2 is R1 plus those markers, so the markers show exactly which special-token
occurrences of R1 came from the client, however the template arranged, trimmed or dropped
the contents (DeepSeek-R1 drops what precedes `</think>`; Qwen moves the system message
into its tools block). Those occurrences are encoded as text; R1 is cut only at the
template's own special tokens. A request whose client text holds no special-token string
gets the normal encoding unchanged (what keeps the KV cache of follow-up turns reusable).
A template that transforms client text so that the two renders cannot be matched, while
client text would make control tokens, is refused (400) rather than encoded unsafely.
"""
from __future__ import annotations

import bisect
import re
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from exo_rkllm.api.errors import APIError

ZWJ = "\u200d"  # what defang() inserts: invisible, and no vocabulary has it inside a special token


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]  # what the NPU must prefill
    text: str  # the rendered template text (for logs, KV realignment, reasoning detection)


@dataclass(frozen=True)
class _Specials:
    """A tokenizer's special-token strings and how the tokenizer matches them."""

    strings: tuple[str, ...]  # longest first
    pattern: re.Pattern[str] | None
    strip: Mapping[str, tuple[bool, bool]]  # token -> (lstrip, rstrip): whitespace the token absorbs
    ids: Mapping[str, int]
    prefixes: frozenset[str]  # every proper beginning of a special token ("<", "<|", "<|im_e"...)
    longest: int


_cache: "weakref.WeakKeyDictionary[Any, _Specials]" = weakref.WeakKeyDictionary()


def _specials(tok: Any) -> _Specials:
    """The strings the tokenizer turns into special tokens when it does not split them."""
    try:
        found = _cache.get(tok)
    except TypeError:  # not weak-referenceable
        found = None
    if found is not None:
        return found
    names: set[str] = {t for t in (getattr(tok, "all_special_tokens", None) or []) if isinstance(t, str) and t}
    strip: dict[str, tuple[bool, bool]] = {}
    for token in (getattr(tok, "added_tokens_decoder", None) or {}).values():
        content = getattr(token, "content", None)
        if isinstance(content, str) and content and getattr(token, "special", False):
            names.add(content)
        if isinstance(content, str):
            strip[content] = (bool(getattr(token, "lstrip", False)), bool(getattr(token, "rstrip", False)))
    strings = tuple(sorted(names, key=len, reverse=True))
    pattern = re.compile("|".join(re.escape(s) for s in strings)) if strings else None
    ids = {s: int(i) for s, i in zip(strings, tok.convert_tokens_to_ids(list(strings)))} if strings else {}
    prefixes = frozenset(s[:k] for s in strings for k in range(1, len(s)))
    found = _Specials(strings, pattern, strip, ids, prefixes, max((len(s) for s in strings), default=0))
    try:
        _cache[tok] = found
    except TypeError:
        pass
    return found


# -- plain text ----------------------------------------------------------------------------------
def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """`text` as plain text: special-token strings in it are split like any text, no BOS added."""
    if not text:
        return []
    out = tokenizer(text, add_special_tokens=False, split_special_tokens=True)
    return [int(i) for i in out["input_ids"]]


def _starts(text: str, specials: _Specials) -> list[int]:
    """Every index where a special-token string starts in `text` (overlapping ones too)."""
    if specials.pattern is None or specials.pattern.search(text) is None:
        return []
    found: set[int] = set()
    for s in specials.strings:
        at = text.find(s)
        while at >= 0:
            found.add(at)
            at = text.find(s, at + 1)
    return sorted(found)


def _trailing_prefix(text: str, specials: _Specials) -> int | None:
    """Where a special token's beginning left at the end of `text` starts (the longest), if any:
    joined with the next string by a template it could complete the token."""
    for k in range(min(specials.longest - 1, len(text)), 0, -1):
        if text[-k:] in specials.prefixes:
            return len(text) - k
    return None


def _insert_after_first(text: str, starts: Iterable[int], mark: str) -> str:
    cuts = sorted({s + 1 for s in starts})
    if not cuts:
        return text
    pieces, last = [], 0
    for cut in cuts:
        pieces.append(text[last:cut])
        last = cut
    pieces.append(text[last:])
    return mark.join(pieces)


def defang(text: str, tokenizer: Any) -> str:
    """`text` with every special-token string of the vocabulary made inert (U+200D after its first
    character), for backends whose server templates and tokenizes (rkllama). Unchanged when the
    text holds none."""
    specials = _specials(tokenizer)
    if not specials.strings or not isinstance(text, str):
        return text
    starts = _starts(text, specials)
    return _insert_after_first(text, starts, ZWJ) if starts else text


_STRUCTURE_KEYS = frozenset({"role", "type"})


def defang_messages(messages: Iterable[Mapping[str, Any]], tokenizer: Any) -> list[dict]:
    """Copies of `messages` with every client string defanged (contents, text parts, tool call
    names and arguments, tool results, names); roles, part types and images kept. A text part
    that ends with a special token's beginning is defanged there too, since the server's
    template may join it with the next part."""
    specials = _specials(tokenizer)

    def walk(value: Any, key: str | None = None) -> Any:
        if isinstance(value, str):
            return value if key in _STRUCTURE_KEYS else defang(value, tokenizer)
        if isinstance(value, Mapping):
            if value.get("type") in ("image_url", "input_image"):
                return dict(value)
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [walk(v) for v in value]
            for i, item in enumerate(items[:-1]):
                if isinstance(item, dict) and isinstance(item.get("text"), str) and specials.strings:
                    at = _trailing_prefix(item["text"], specials)
                    if at is not None:
                        item["text"] = _insert_after_first(item["text"], [at], ZWJ)
            return items
        return value

    return [walk(dict(m)) for m in messages]


# -- the prompt ---------------------------------------------------------------------------------
def _mark_all(value: Any, specials: _Specials, mark: str) -> tuple[Any, bool]:
    """A copy of `value` with a marker after the first character of every special-token string in
    every string (keys too) and of a special token's beginning at a string's end; whether any."""
    changed = False

    def mark_text(text: str) -> str:
        nonlocal changed
        starts = _starts(text, specials)
        tail = _trailing_prefix(text, specials)
        if tail is not None:
            starts.append(tail)
        if not starts:
            return text
        changed = True
        return _insert_after_first(text, starts, mark)

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            return mark_text(item)
        if isinstance(item, Mapping):
            return {(mark_text(k) if isinstance(k, str) else k): walk(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [walk(v) for v in item]
        return item

    return walk(value), changed


def _render(tok: Any, messages: Sequence[Mapping], tools: Sequence[Mapping] | None,
            kwargs: Mapping[str, object], add_generation_prompt: bool) -> str:
    try:
        text = tok.apply_chat_template([dict(m) for m in messages], tools=list(tools) if tools else None,
                                       add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)
    except Exception as exc:  # a template's raise_exception, or a shape it cannot render
        raise APIError(400, f"the model's chat template cannot render these messages: {exc}",
                       param="messages", code="template_error") from exc
    if not isinstance(text, str):
        raise APIError(500, "the chat template did not render a string", code="template_error")
    return text


def _marker(*texts: str) -> str:
    """A private-use character none of the texts contains."""
    for code in range(0xE000, 0xF900):
        mark = chr(code)
        if not any(mark in t for t in texts):
            return mark
    raise APIError(400, "the request uses every private-use character", code="invalid_value")


def _insertions(real: str, marked: str, mark: str) -> list[int] | None:
    """Positions in `real` before which `marked` has a marker, if `marked` is `real` plus markers."""
    pieces = marked.split(mark)
    if "".join(pieces) != real:
        return None
    positions, at = [], 0
    for piece in pieces[:-1]:
        at += len(piece)
        positions.append(at)
    return positions


def _occurrences(text: str, specials: _Specials) -> list[re.Match[str]]:
    return list(specials.pattern.finditer(text)) if specials.pattern else []


def _post_processor_ends(tok: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds around a text when asked to (a BOS, an EOS), found on a probe."""
    probe = "a"
    plain = list(tok.encode(probe, add_special_tokens=False))
    full = list(tok.encode(probe))
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def _with_ends(tok: Any, body: list[int]) -> list[int]:
    """`body` with what the tokenizer's normal encoding adds (the engine encodes that way), and a
    BOS only once when the template wrote it itself."""
    prefix, suffix = _post_processor_ends(tok)
    if prefix and body[:len(prefix)] == prefix:
        prefix = []
    return prefix + body + suffix


def _encode_cut(tok: Any, text: str, template_tokens: Sequence[re.Match[str]], specials: _Specials) -> list[int]:
    """`text` cut at the template's own special tokens (their ids), every stretch between them
    encoded with special-token strings split as text. With every occurrence given, this is the
    tokenizer's own encoding (it cuts at its special tokens the same way)."""
    ids: list[int] = []
    last = 0
    stretches: list[tuple[str, int | None, bool, bool]] = []  # (text, token id or None for text, lstrip, rstrip)
    for match in template_tokens:
        stretches.append((text[last:match.start()], None, False, False))
        lstrip, rstrip = specials.strip.get(match.group(), (False, False))
        stretches.append(("", specials.ids[match.group()], lstrip, rstrip))
        last = match.end()
    stretches.append((text[last:], None, False, False))
    # whitespace a token absorbs (AddedToken lstrip/rstrip) belongs to the token, not to the text
    texts = [s[0] for s in stretches]
    for i, (_, token_id, lstrip, rstrip) in enumerate(stretches):
        if token_id is None:
            continue
        if lstrip and i > 0:
            texts[i - 1] = texts[i - 1].rstrip()
        if rstrip and i + 1 < len(texts):
            texts[i + 1] = texts[i + 1].lstrip()
    for (_, token_id, _, _), piece in zip(stretches, texts):
        if token_id is None:
            ids.extend(encode_plain(tok, piece))
        else:
            ids.append(token_id)
    return ids


def build_chat_prompt(tokenizer: Any, messages: Sequence[Mapping], *, tools: Sequence[Mapping] | None = None,
                      template_kwargs: Mapping[str, object] | None = None,
                      add_generation_prompt: bool = True) -> Prompt:
    """The prompt of a chat request: the template's text, and ids in which only the template's
    own structure is special tokens. APIError(400) if the template cannot render the request, or
    if client text holds special-token strings the template transforms beyond recognition."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise APIError(400, "this model has no chat template: use /v1/completions with a prompt",
                       code="no_chat_template")
    kwargs = dict(template_kwargs or {})
    tools = list(tools) if tools else None
    real = _render(tokenizer, messages, tools, kwargs, add_generation_prompt)
    specials = _specials(tokenizer)

    def normal() -> Prompt:
        return Prompt(tuple(_with_ends(tokenizer, [int(i) for i in tokenizer.encode(real, add_special_tokens=False)])),
                      real)

    if specials.pattern is None:
        return normal()
    mark = _marker(real, *_strings(messages), *_strings(tools), *_strings(kwargs))
    marked_messages, in_messages = _mark_all(list(messages), specials, mark)
    marked_tools, in_tools = _mark_all(tools, specials, mark)
    marked_kwargs, in_kwargs = _mark_all(kwargs, specials, mark)
    if not (in_messages or in_tools or in_kwargs):
        return normal()  # no client string can make a special token
    marked = _render(tokenizer, marked_messages, marked_tools, marked_kwargs, add_generation_prompt)
    occurrences = _occurrences(real, specials)
    positions = _insertions(real, marked, mark)
    if positions is None:
        # The template changed client text (escaped it, cut it...). Safe only if the client's
        # special-token strings did not survive: then R1 has exactly the template's own ones.
        if [m.group() for m in occurrences] == [m.group() for m in _occurrences(marked, specials)]:
            return normal()
        raise _unplaceable(tokenizer, messages, tools, kwargs, add_generation_prompt, specials, mark)
    client = [m for m in occurrences if _covers(positions, m.start(), m.end())]
    if not client:
        return normal()
    own = [m for m in occurrences if not _covers(positions, m.start(), m.end())]
    body = _encode_cut(tokenizer, real, own, specials)
    return Prompt(tuple(_with_ends(tokenizer, body)), real)


def shared_prefix_len(tokenizer: Any, messages: Sequence[Mapping], prompt: Prompt, *,
                      tools: Sequence[Mapping] | None = None,
                      template_kwargs: Mapping[str, object] | None = None) -> int:
    """How many of `prompt.ids` are the conversation's leading system (or developer) messages as the
    template renders them: the part other conversations share, which the engine can save once and
    restore for each. 0 when the conversation has none, or when the template does not render them as
    an exact prefix of the prompt's ids (a template that folds the system text into the first user
    turn): never a guess."""
    lead = 0
    while lead < len(messages) and messages[lead].get("role") in ("system", "developer"):
        lead += 1
    if lead == 0 or lead == len(messages):
        return 0
    try:
        head = build_chat_prompt(tokenizer, messages[:lead], tools=tools, template_kwargs=template_kwargs,
                                 add_generation_prompt=False)
    except Exception:  # a template that wants a user turn: no shared prefix
        return 0
    n = len(head.ids)
    if head.ids and prompt.ids[:n] == head.ids and n < len(prompt.ids):
        return n
    # the tokenizer's end token (a post-processor's) is not the prompt's boundary: try without it
    _, ends = _post_processor_ends(tokenizer)
    if ends and head.ids[-len(ends):] == tuple(ends):
        n -= len(ends)
        if n > 0 and prompt.ids[:n] == head.ids[:n]:
            return n
    return 0


def _covers(positions: Sequence[int], start: int, end: int) -> bool:
    """Whether a marker was inserted strictly inside [start, end): the occurrence has client text."""
    at = bisect.bisect_right(positions, start)
    return at < len(positions) and positions[at] < end


def _strings(value: Any) -> list[str]:
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Mapping):
            stack.extend(k for k in item.keys() if isinstance(k, str))
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return out


def _unplaceable(tok: Any, messages: Sequence[Mapping], tools: Any, kwargs: Mapping[str, object],
                 add_generation_prompt: bool, specials: _Specials, mark: str) -> APIError:
    """The 400 for special-token text the template transforms: it names the first part of the
    request that, marked alone, cannot be matched."""
    real = _render(tok, messages, tools, kwargs, add_generation_prompt)
    where, part = None, None
    for index, message in enumerate(messages):
        marked, changed = _mark_all(dict(message), specials, mark)
        if not changed:
            continue
        trial = [marked if i == index else m for i, m in enumerate(messages)]
        if _insertions(real, _render(tok, trial, tools, kwargs, add_generation_prompt), mark) is None:
            where, part = f"messages[{index}]", message
            break
    if where is None:
        where, part = ("tools", tools) if _mark_all(tools, specials, mark)[1] else ("chat_template_kwargs", kwargs)
    found = next((s for text in _strings(part) for s in specials.strings if s in text), None)
    example = f" ({found!r})" if found else ""
    return APIError(400, f"'{where}' holds special-token text{example} that this model's chat template "
                    "rewrites, so it cannot be kept as plain text: remove it from the message",
                    param=where, code="special_token_text")
