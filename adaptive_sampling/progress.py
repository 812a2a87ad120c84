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


class Bar:
    """A counter-style progress bar (tqdm when installed, else a minimal stderr line)."""

    def __init__(self, total: int, desc: str | None = None, disable: bool | None = None):
        self.total, self.desc, self.done = total, desc, 0
        self.disable = bool(disable)
        self._tqdm = None
        if not self.disable:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self._tqdm = tqdm(total=total, desc=desc)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif not self.disable:
            label = f"{self.desc}: " if self.desc else ""
            sys.stderr.write(f"\r{label}{self.done}/{self.total}")

    def set_description(self, desc: str) -> None:
        if self._tqdm is not None:
            self._tqdm.set_description(desc)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif not self.disable:
            sys.stderr.write("\n")

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
