"""Progress bar for the sampling loops: tqdm when installed, else a minimal stderr bar.

``disable`` follows k-diffusion: ``None`` or ``False`` shows the bar, ``True`` hides it.
"""

from __future__ import annotations

import sys
from typing import Iterator


def steps(n: int, disable: bool | None = None, desc: str | None = None) -> Iterator[int]:
    if disable:
        yield from range(n)
        return
    try:
        from tqdm.auto import trange
    except ImportError:
        yield from _plain(n, desc)
        return
    bar = trange(n, desc=desc)
    try:
        yield from bar
    finally:
        bar.close()


def _plain(n: int, desc: str | None) -> Iterator[int]:
    label = f"{desc}: " if desc else ""
    try:
        for i in range(n):
            yield i
            sys.stderr.write(f"\r{label}{i + 1}/{n}")
        sys.stderr.write("\n")
    finally:
        sys.stderr.flush()
