"""Timed, nested step logging (like mkosi's complete_step) and a simple progress line."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_local = threading.local()  # nesting depth per thread (verify boots VMs in parallel threads)


def _depth() -> int:
    return int(getattr(_local, "depth", 0))


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


def info(message: str) -> None:
    print(f"{_stamp()} {'  ' * _depth()}{message}", file=sys.stderr, flush=True)


@contextmanager
def step(name: str) -> Iterator[None]:
    """Log the start, end and elapsed time of a step."""
    info(f"▶ {name}")
    start = time.monotonic()
    _local.depth = _depth() + 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _local.depth = _depth() - 1
        elapsed = time.monotonic() - start
        info(f"{'✔' if ok else '✘'} {name} ({elapsed:.1f}s)")


class Progress:
    """A throttled 'label: 42% (1.2/2.9 GiB)' line for long copies and downloads."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def advance(self, amount: int) -> None:
        self.done += amount
        now = time.monotonic()
        if now - self._last >= (0.2 if self._tty else 10.0) or self.done >= self.total:
            self._last = now
            pct = min(100, self.done * 100 // self.total)
            line = f"{self.label}: {pct}% ({self.done / 2**20:.0f}/{self.total / 2**20:.0f} MiB)"
            if self._tty:
                print(f"\r{'  ' * _depth()}{line}", end="", file=sys.stderr, flush=True)
            else:
                info(line)

    def close(self) -> None:
        if self._tty:
            print(file=sys.stderr, flush=True)
