"""stratad: the main loop against a simulated machine, and its logging."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import strata_agent
from agent_fakes import activate_and_run, make_machine
from strata_agent.config import Config
from strata_agent.daemon import Daemon, setup_logging
from strata_agent.netwatch import IpWatcher


def test_loop_waits_then_activates_runs_and_watches(tmp_path: Path) -> None:
    machine = make_machine(tmp_path, activation=None)
    agent, _ = machine.agent()
    daemon = Daemon(agent, machine.config, threading.Event(), IpWatcher(agent))
    daemon.idle = lambda seconds: machine.clock.advance(seconds)  # type: ignore[method-assign]
    daemon.turn()
    assert agent.current_state == "waiting-for-activation"
    (machine.root / "proc/cmdline").write_text("strata.hostname=looped\n")
    daemon.turn()  # finds the activation
    daemon.turn()  # runs every step
    assert agent.current_state == "ready"
    machine.system.route_ip = "10.0.0.99"
    machine.clock.advance(10)
    daemon.turn()  # ready: watches the IP
    assert machine.state()["facts"]["node_ip"] == "10.0.0.99"
    assert machine.system.restarts == ["k3s.service"]


def test_run_retries_a_failed_step_and_stops_on_request(tmp_path: Path) -> None:
    machine = make_machine(tmp_path, node_ready_after=10**6)
    machine.config = Config(node_ready_timeout=10)
    agent, _ = machine.agent()
    assert activate_and_run(agent) == "failed"
    machine.system.node_ready_after = 0  # e.g. fixed by a reboot
    restarted, runner = machine.agent()
    stop = threading.Event()
    daemon = Daemon(restarted, machine.config, stop, IpWatcher(restarted))
    daemon.idle = lambda seconds: stop.set()  # type: ignore[method-assign]
    daemon.run()
    assert restarted.current_state == "ready"
    assert runner.count("useradd") == runner.count("hostname") == 0
    assert stop.is_set()


def test_logging_goes_to_stderr_and_the_log_file(tmp_path: Path, capsys: object) -> None:
    log_file = tmp_path / "var/log/strata/agent.log"
    setup_logging(log_file)
    try:
        logging.getLogger("strata_agent.test").info("hello %s", "journal")
        for handler in logging.getLogger("strata_agent").handlers:
            handler.flush()
        assert "INFO hello journal" in log_file.read_text()
    finally:
        logger = logging.getLogger("strata_agent")
        for handler in list(logger.handlers):
            handler.close()
            logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


def test_stratad_process_serves_status_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The real entry point, left waiting for an activation (so it runs no system command but `ip`)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "etc/strata").mkdir(parents=True)
    (tmp_path / "etc/strata/agent.json").write_text(json.dumps({"api": {"bind": "127.0.0.1", "port": port}}))
    package_dir = Path(strata_agent.__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(package_dir)}
    process = subprocess.Popen(
        [sys.executable, "-m", "strata_agent", "--root", str(tmp_path)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        status = None
        deadline = time.monotonic() + 10
        while status is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1) as response:
                    status = json.loads(response.read())
            except OSError:
                time.sleep(0.05)
        assert status is not None and status["state"] == "waiting-for-activation"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        stderr = process.communicate()[1]
    assert "SIGTERM: stopping" in stderr
    log_text = (tmp_path / "var/log/strata/agent.log").read_text()
    assert "starting in state waiting-for-activation" in log_text and "stopped" in log_text
