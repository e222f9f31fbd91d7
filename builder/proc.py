"""Running host commands: streamed to the log, failures turned into clear errors."""

from __future__ import annotations

import subprocess
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .errors import StrataError
from .log import info

StrPath = str | Path


def run(
    cmd: Sequence[StrPath],
    *,
    env: Mapping[str, str] | None = None,
    cwd: StrPath | None = None,
    stdin: str | None = None,
    show: Callable[[str], bool] | None = None,
    what: str | None = None,
) -> str:
    """Run `cmd`, returning its output; lines for which `show` is true are logged as they come.

    On failure, raise StrataError with the command and the last lines of its output.
    """
    args = [str(c) for c in cmd]
    tail: deque[str] = deque(maxlen=40)
    lines: list[str] = []
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            text=True,
            errors="replace",
        )
    except FileNotFoundError as e:
        raise StrataError(f"cannot run {args[0]}: not installed") from e
    assert proc.stdout is not None
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        tail.append(line)
        if show is not None and show(line):
            info(line)
    code = proc.wait()
    if code != 0:
        output = "\n".join(f"    {t}" for t in tail)
        raise StrataError(f"{what or args[0]} failed (exit {code}): {' '.join(args)}\n{output}")
    return "\n".join(lines)
