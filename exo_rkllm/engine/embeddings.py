"""From RKLLM's last hidden layer to one embedding vector per input.

The runtime's last-hidden-layer mode gives one row per input token, shape (n_tokens, width); an
embedding is one vector, so the rows are pooled, then L2-normalised (cosine similarity, what
embedding clients compute, is then a dot product; OpenAI's embeddings are unit length too).

Pooling methods (the Modelfile key EMBEDDING_POOLING):
  - "last" (the default): the last token's row. A decoder LLM attends causally, so only the last
    position has seen the whole input; decoder embedding models are trained for exactly that.
    Qwen3-Embedding's card and reference code pool the last token and L2-normalise (its
    sentence-transformers config says `pooling_mode_lasttoken`), and rkllama, the one RKLLM
    server with an embeddings route, returns the last token's row of this same hidden layer (its
    callback reads row num_tokens-1; it does not normalise). RKLLM models are decoders, so "last"
    is the default.
  - "mean": the mean over the tokens (encoder models trained with mean pooling, e5/MiniLM style).
  - "cls": the first row (BERT-style models trained on a leading CLS token).
A server that pooled already (EmbeddingOutput.pooled) gives one row: it is only normalised.

Inputs are token ids. Text is encoded as plain text (a user's text never becomes a control token);
the tokenizer's own framing is kept: the special tokens its post-processor adds around any text
(a BOS for Llama-style tokenizers; Qwen3-Embedding's tokenizer appends `<|endoftext|>`, the token
whose row its reference implementation pools), found by encoding a probe both ways.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from exo_rkllm.errors import GenerationError, ModelUnavailable
from exo_rkllm.runtime.base import EmbeddingOutput

POOLING_KEY = "EMBEDDING_POOLING"


class Pooling(str, enum.Enum):
    LAST = "last"
    MEAN = "mean"
    CLS = "cls"


DEFAULT_POOLING = Pooling.LAST


@dataclass(frozen=True)
class EmbeddingResult:
    """What the embeddings route answers with: one unit vector per input, in order."""

    vectors: list[list[float]]
    prompt_tokens: int  # tokens the model read, over all inputs (OpenAI's usage.prompt_tokens)
    width: int  # length of each vector


def pooling_method(options: Mapping[str, str]) -> Pooling:
    """The model's pooling from its Modelfile options; a value we do not know makes the model unusable
    for embeddings (guessing would give vectors that look fine and rank badly)."""
    raw = (options.get(POOLING_KEY) or "").strip()
    if not raw:
        return DEFAULT_POOLING
    try:
        return Pooling(raw.lower())
    except ValueError:
        known = ", ".join(p.value for p in Pooling)
        raise ModelUnavailable(f"the Modelfile says {POOLING_KEY}={raw!r}; use one of {known}") from None


def _rows(hidden: Any) -> np.ndarray:
    rows = np.asarray(hidden, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows.reshape(1, -1)
    if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] < 1:
        raise GenerationError(f"the runtime returned a hidden layer of shape {rows.shape}; expected (tokens, width)")
    return rows


def pool(hidden: Any, method: Pooling | str) -> np.ndarray:
    """One float32 vector from the (n_tokens, width) hidden rows (not normalised: see `normalize`)."""
    rows = _rows(hidden)
    method = Pooling(method)
    if method is Pooling.LAST:
        vector = rows[-1]
    elif method is Pooling.CLS:
        vector = rows[0]
    else:
        vector = rows.mean(axis=0, dtype=np.float64)
    return np.asarray(vector, dtype=np.float32)


def normalize(vector: Any) -> np.ndarray:
    """Unit L2 length. Computed in float64 (thousands of float32 squares lose digits); a zero vector
    stays zero (it has no direction; dividing would give NaN); a non-finite one is the runtime's failure."""
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise GenerationError("the runtime returned a hidden layer with non-finite values")
    norm = math.sqrt(float(np.dot(v, v)))
    return (v / norm if norm > 0 else v).astype(np.float32)


def embedding_vector(output: EmbeddingOutput, method: Pooling | str) -> np.ndarray:
    """The unit vector for one runtime output: pooled by `method`, or only normalised if the server pooled."""
    if output.pooled:
        rows = _rows(output.hidden)
        if rows.shape[0] != 1:
            raise GenerationError(f"the server said it pooled but returned {rows.shape[0]} rows")
        return normalize(rows[0])
    return normalize(pool(output.hidden, method))


def plain_ids(tokenizer: Any, text: str) -> list[int]:
    """`text` as plain text: special-token text in it is split like any other text."""
    return [int(t) for t in tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]]


def tokenizer_framing(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prefix, suffix): the special tokens the tokenizer's post-processor puts around any text.

    Found by encoding a probe with and without them; kept only if the difference is special tokens
    around the unchanged plain ids, so nothing here can come from the text itself."""
    probe = "a"
    plain = plain_ids(tokenizer, probe)
    framed = [int(t) for t in tokenizer(probe, add_special_tokens=True, split_special_tokens=True)["input_ids"]]
    specials = {int(i) for i in getattr(tokenizer, "all_special_ids", ())}
    n = len(plain)
    for start in range(len(framed) - n + 1):
        if framed[start:start + n] == plain:
            prefix, suffix = tuple(framed[:start]), tuple(framed[start + n:])
            if all(t in specials for t in prefix + suffix):
                return prefix, suffix
            break
    return (), ()


def text_ids(tokenizer: Any, text: str, framing: tuple[Sequence[int], Sequence[int]] | None = None) -> list[int]:
    """The ids to embed for `text`: the tokenizer's framing around the text's plain ids."""
    prefix, suffix = framing if framing is not None else tokenizer_framing(tokenizer)
    return [*prefix, *plain_ids(tokenizer, text), *suffix]
