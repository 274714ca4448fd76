"""Conversation prefixes as hashes: how a node says which conversations its KV cache and saved states
hold without sending their tokens, and how the node taking a request finds the node holding the
longest part of its prompt.

Token ids are cut into blocks of BLOCK tokens; the hash of block k covers every token before its end
(chained, as vLLM's prefix-cache blocks), so equal hashes mean equal prefixes. A node does not send
every block's hash: for each sequence it holds, the blocks at 1, 2, 4, 8, ... blocks and its last full
block. A prompt that continues a held conversation matches its last block (the whole history); one
that departs from it inside the history still matches the power-of-two block before the departure,
within a factor of two of what is really shared (the scheduler then reuses exactly what matches)."""
from __future__ import annotations

import functools
import hashlib
from typing import Iterable, Sequence

import numpy as np

BLOCK = 64  # tokens per hashed block
HASH_BYTES = 8  # 64-bit hashes: a collision between two prefixes is a placement miss, never wrong text


def block_hashes(ids: Sequence[int]) -> list[str]:
    """The chained hash of each full block of `ids`: element k covers ids[:(k + 1) * BLOCK]."""
    out: list[str] = []
    data = np.asarray(ids, dtype="<i8").tobytes()
    step = BLOCK * 8
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    for end in range(step, len(data) + 1, step):
        h.update(data[end - step:end])
        out.append(h.copy().hexdigest())
    return out


def advertised(sequences: Iterable[Sequence[int]], limit: int) -> list[str]:
    """What a node sends for the sequences it holds (most important first): per sequence, the hashes
    of its last full block and of the blocks at powers of two; at most `limit` hashes, no repeats."""
    out: dict[str, None] = {}
    for ids in sequences:
        for h in _picks(tuple(ids)):
            out.setdefault(h, None)
            if len(out) >= limit:
                return list(out)
    return list(out)


@functools.lru_cache(maxsize=256)
def _picks(ids: tuple[int, ...]) -> tuple[str, ...]:
    """One sequence's advertised hashes (a node sends the same sequences every heartbeat)."""
    hashes = block_hashes(ids)
    if not hashes:
        return ()
    picks = [len(hashes) - 1]
    k = 1
    while k <= len(hashes):
        picks.append(k - 1)
        k *= 2
    return tuple(hashes[i] for i in picks)


def matched_tokens(prompt_hashes: Sequence[str], held: "set[str] | frozenset[str]") -> int:
    """How many of the prompt's first tokens a node holding `held` has (a multiple of BLOCK; 0: none)."""
    for k in range(len(prompt_hashes) - 1, -1, -1):
        if prompt_hashes[k] in held:
            return (k + 1) * BLOCK
    return 0
