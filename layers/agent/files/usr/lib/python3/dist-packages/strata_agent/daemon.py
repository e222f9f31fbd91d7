"""stratad: logging, config, the API thread and the main loop."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from . import __version__
from .agent import Agent
from .api import ApiServer
from .auth import Authenticator, NonceStore
from .config import Config, ConfigError, load_config
from .netwatch import IpWatcher
from .paths import Paths
from .state import FAILED, PHASES, READY, WAITING
from .system import AgentStopping, SubprocessRunner, SystemClock

log = logging.getLogger("strata_agent")

IDLE_WHEN_FAILED = 60.0


def setup_logging(log_file: Path | None, level: int = logging.INFO) -> None:
    """stderr (the journal adds time and unit) plus an appended log file with timestamps."""
    log.setLevel(level)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(stderr)
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            to_file = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        except OSError as err:
            log.warning("cannot write %s (%s): logging to the journal only", log_file, err)
        else:
            to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(to_file)


class Daemon:
    """The main loop: wait for an activation, run the steps, then watch the node IP."""

    def __init__(self, agent: Agent, config: Config, stop: threading.Event, watcher: IpWatcher) -> None:
        self.agent = agent
        self.config = config
        self.stop = stop
        self.watcher = watcher

    def idle(self, seconds: float) -> None:
        """Sleep until `seconds` pass, the API wakes us or we are told to stop."""
        self.agent.wake.wait(seconds)

    def turn(self) -> None:
        """One pass of the loop."""
        self.agent.wake.clear()  # a wake-up from here on ends the coming idle at once
        state = self.agent.current_state
        if state == WAITING:
            if not self.agent.poll_activation():
                self.idle(self.config.poll_interval)
        elif state in PHASES:
            self.agent.run_pending(tick=self.watcher.maybe_check)
        elif state == READY:
            self.watcher.maybe_check()
            self.idle(min(self.config.ip_check_interval, 5.0))
        elif state == FAILED:
            self.idle(IDLE_WHEN_FAILED)

    def run(self) -> None:
        self.agent.retry_failed()
        try:
            while not self.stop.is_set():
                self.turn()
        except AgentStopping:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stratad", description="strata first-boot agent")
    parser.add_argument("--root", type=Path, default=Path("/"), help="root prefix for every path (tests)")
    parser.add_argument("--config", type=Path, help="config file (default <root>/etc/strata/agent.json)")
    parser.add_argument("--debug", action="store_true", help="log every command")
    parser.add_argument("--version", action="version", version=f"stratad {__version__}")
    args = parser.parse_args(argv)
    paths = Paths(args.root)
    setup_logging(paths.log_file, logging.DEBUG if args.debug else logging.INFO)
    try:
        config = load_config(args.config or paths.config_file)
    except ConfigError as err:
        log.error("bad config: %s", err)
        return 2
    paths.state_dir.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()
    agent = Agent(paths, config, SubprocessRunner(), clock=SystemClock(stop))
    authenticator = Authenticator(config.admin_keys, config.signature_window, NonceStore(paths.nonces_file))
    if not authenticator.keys:
        log.warning("no admin keys configured (layers.agent.admin_keys): signed endpoints answer 403")
    try:
        api = ApiServer(agent, authenticator, bind=config.api_bind, port=config.api_port)
    except OSError as err:
        log.error("cannot listen on %s port %d: %s", config.api_bind, config.api_port, err)
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("stratad %s starting in state %s", __version__, agent.current_state)
    api.start()
    try:
        Daemon(agent, config, stop, IpWatcher(agent)).run()
    finally:
        api.stop()
    log.info("stopped")
    return 0
