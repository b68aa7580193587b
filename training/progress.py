"""Progress for long steps: a tqdm bar on a terminal; elsewhere (CI logs, nohup, a pipe), where tqdm stays silent,
one plain line every few seconds, so a step of minutes never looks hung."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


class LineProgress:
    """The part of tqdm's interface the stages use (iterate, update, set_postfix, close, context manager), as a
    line on stderr at most every `every` seconds: 'desc: 120/400 (30 %), 12.3 unit/s, 10 s'."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
                 every: float = 10.0):
        self.iterable, self.desc, self.unit, self.every = iterable, desc, unit, every
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix = 0, ""
        self.start = self.last = time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._print(now)

    def close(self) -> None:
        """Nothing to print: the step's own result line follows."""

    def _print(self, now: float) -> None:
        elapsed = now - self.start
        of = f"/{self.total} ({100 * self.n / self.total:.0f} %)" if self.total else ""
        rate = f", {self.n / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}{of}{rate}{extra}, {elapsed:.0f} s", file=sys.stderr, flush=True)


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
             every: float = 10.0):
    """tqdm on a terminal, LineProgress otherwise; enabled=False (e.g. a non-main distributed process): silent."""
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, mininterval=1)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, every=every)
