"""Order-free, process-stable random streams: one generator per (seed, item key, step name)."""

from __future__ import annotations

import hashlib

import numpy as np


def _u32_words(text: str) -> list[int]:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()  # file names need not be UTF-8
    return [int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")]


def seed_words(seed: int, key: str, step: str) -> list[int]:
    """The entropy words for one stream (recorded in manifests so a stream can be re-derived)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):  # 1.5 would be truncated to another stream
        raise TypeError(f"seed must be a non-negative integer, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if not isinstance(key, str) or not isinstance(step, str):
        raise TypeError(f"the item key and step name must be strings, got {type(key).__name__} and {type(step).__name__}")
    return [int(seed) & 0xFFFFFFFF, int(seed) >> 32, *_u32_words(key), *_u32_words(step)]


def item_rng(seed: int, key: str, step: str) -> np.random.Generator:
    """A generator that depends only on ``seed``, the item ``key`` and the ``step`` name.

    It never depends on file order, worker count or which other items are processed, and never on
    Python's per-process salted ``hash()``.
    """
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed_words(seed, key, step))))
