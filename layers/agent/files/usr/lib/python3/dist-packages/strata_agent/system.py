"""The two things tests replace: the command runner and the clock."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

COMMAND_NOT_FOUND = 127
COMMAND_TIMED_OUT = 124


@dataclass(frozen=True)
class CommandResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def missing(self) -> bool:
        """The program itself is not installed."""
        return self.returncode == COMMAND_NOT_FOUND


class Runner(Protocol):
    def run(
        self, args: Sequence[str], *, input_text: str | None = None, timeout: float | None = None
    ) -> CommandResult:
        """Run `args` (never through a shell); a missing program gives returncode 127."""
        ...


class SubprocessRunner:
    """Runs real commands, with a C locale so their output parses the same everywhere."""

    def __init__(self, default_timeout: float = 300) -> None:
        self.default_timeout = default_timeout
        self.env = {**os.environ, "LC_ALL": "C.UTF-8"}

    def run(
        self, args: Sequence[str], *, input_text: str | None = None, timeout: float | None = None
    ) -> CommandResult:
        argv = tuple(args)
        limit = self.default_timeout if timeout is None else timeout
        try:
            done = subprocess.run(
                argv,
                input=input_text,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=limit,
                env=self.env,
                check=False,
            )
        except FileNotFoundError:
            return CommandResult(argv, COMMAND_NOT_FOUND, "", f"{argv[0]}: command not found")
        except subprocess.TimeoutExpired:
            return CommandResult(argv, COMMAND_TIMED_OUT, "", f"timed out after {limit:g} s")
        return CommandResult(argv, done.returncode, done.stdout, done.stderr)


class AgentStopping(BaseException):
    """Raised out of a wait when the daemon is told to stop; like a power cut, the step is redone later."""


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock time, unix seconds."""
        ...

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None:
        """Wait; raises AgentStopping when the daemon is stopping."""
        ...


class SystemClock:
    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop or threading.Event()

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise AgentStopping()
