"""Argument types shared by the benchmark scripts: a bad option is argparse's usage line and one error line
(exit 2) before anything is measured, never a traceback halfway or a JSON of nothing (campaign 12b F10)."""

from __future__ import annotations

import argparse
from typing import Callable


def count(minimum: int = 1) -> Callable[[str], int]:
    """An integer option of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} is less than {minimum}")
        return v

    return parse


def names(allowed, *, empty: bool = False) -> Callable[[str], list[str]]:
    """A comma-separated list of names out of ``allowed`` (``empty``: none is accepted too)."""

    def parse(text: str) -> list[str]:
        got = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in got if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r}; choose from {', '.join(allowed)}")
        if not got and not empty:
            raise argparse.ArgumentTypeError("names nothing")
        return got

    return parse


def size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT``, each at least 16."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT (e.g. 12000x9000)") from None
    if min(w, h) < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: each side must be at least 16")
    return w, h


def sides(text: str) -> list[str]:
    """``drive`` or square sides of at least 64 px, comma-separated (benchmarks/gpu.py --sizes)."""
    got = [v.strip() for v in text.split(",") if v.strip()]
    for v in got:
        if v != "drive" and not (v.isdigit() and int(v) >= 64):
            raise argparse.ArgumentTypeError(f"{v!r}: give drive or a side of at least 64 px")
    if not got:
        raise argparse.ArgumentTypeError("names no size")
    return got


def counts(text: str) -> list[int]:
    """A comma-separated list of positive integers."""
    return [count(1)(v.strip()) for v in text.split(",") if v.strip()] or count(1)("")
