"""The agent: the state machine that runs the steps, shared by the daemon loop and the API thread."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from typing import Any

from . import __version__, netinfo
from .activation import Activation, ActivationError, ActivationSources
from .config import Config
from .fsutil import read_json, write_json
from .paths import Paths
from .state import (
    ACTIVATING,
    ALL_STEPS,
    DONE,
    FAILED,
    MAX_HISTORY,
    PHASES,
    READY,
    RUNNING,
    STEP_FAILED,
    WAITING,
    AgentState,
    StateStore,
    StepRecord,
    phase_of,
    status_view,
    steps_for_role,
    timestamp,
)
from .steps import STEP_FUNCTIONS, StepContext, StepError, StepLog
from .system import Clock, Runner, SystemClock

log = logging.getLogger(__name__)

# Called as hook("before", step) once the step is marked running and saved, and hook("after", step)
# once its work is done but before that is saved: where tests cut the power.
Hook = Callable[[str, str], None]


class Conflict(RuntimeError):
    """The request does not fit the current state (HTTP 409)."""


class UnknownStep(LookupError):
    pass


def _no_hook(point: str, step: str) -> None:
    pass


class Agent:
    def __init__(
        self,
        paths: Paths,
        config: Config,
        runner: Runner,
        *,
        clock: Clock | None = None,
        hook: Hook = _no_hook,
    ) -> None:
        self.paths = paths
        self.config = config
        self.runner = runner
        self.clock = clock or SystemClock()
        self.hook = hook
        self.lock = threading.RLock()
        self.wake = threading.Event()  # set when the API changes what the daemon loop should do
        self.store = StateStore(paths.state_file)
        self.state: AgentState = self.store.load()
        saved = read_json(paths.activation_file)
        self.activation: Activation | None = None if saved is None else Activation.from_json(saved)
        self.sources = ActivationSources(paths, runner, config.defaults)
        self.activation_error: str | None = None

    # -- state bookkeeping (callers hold the lock)

    def _save(self) -> None:
        self.store.save(self.state)

    def _transition(self, new: str) -> None:
        old = self.state.state
        if old == new:
            return
        self.state.state = new
        self.state.transitions.append({"time": timestamp(self.clock.now()), "from": old, "to": new})
        del self.state.transitions[:-MAX_HISTORY]
        log.info("state: %s -> %s", old, new)

    @property
    def current_state(self) -> str:
        with self.lock:
            return self.state.state

    # -- activation

    def poll_activation(self) -> bool:
        """While waiting, take the activation from the first source that has one; True once activated."""
        if self.current_state != WAITING:
            return False
        found = self.activation  # accepted before a power cut lost the state change
        if found is None:
            try:
                found = self.sources.find()
            except ActivationError as err:
                if str(err) != self.activation_error:
                    log.error("activation rejected: %s", err)
                self.activation_error = str(err)
                return False
        self.activation_error = None
        if found is None:
            return False
        try:
            self.activate(found)
        except Conflict:
            return False  # POST /activate got there first
        return True

    def activate(self, activation: Activation) -> None:
        with self.lock:
            if self.state.state != WAITING:
                raise Conflict(f"already activated (state {self.state.state})")
            write_json(self.paths.activation_file, activation.to_json(), mode=0o600)
            self.activation = activation
            self.state.role = activation.role
            self.state.activation = activation.public_view()
            self.state.steps = {step: StepRecord() for step in steps_for_role(activation.role)}
            self.state.failure = None
            self._transition(ACTIVATING)
            self._save()
        log.info(
            "activated from %s: %s, admin %s, %s role",
            activation.source,
            activation.fqdn,
            activation.admin_user,
            activation.role,
        )
        self.wake.set()

    # -- steps

    def _next_step(self) -> str | None:
        for step in self.state.ordered_steps():
            if self.state.steps[step].status != DONE:
                return step
        return None

    def run_pending(self, tick: Callable[[], None] | None = None) -> str:
        """Run the remaining steps in order until ready or a failure; returns the state reached."""
        while True:
            with self.lock:
                if self.state.state not in PHASES:
                    return self.state.state
                step = self._next_step()
                if step is None:
                    self.state.current_step = None
                    self._transition(READY)
                    self._save()
                    return READY
                self._transition(phase_of(step))
                self.state.steps[step] = StepRecord(status=RUNNING, started=timestamp(self.clock.now()))
                self.state.current_step = step
                self._save()
            self._execute(step, tick or (lambda: None))

    def _execute(self, step: str, tick: Callable[[], None]) -> None:
        step_log = StepLog(step)
        started = self.clock.monotonic()
        step_log.add("started")
        try:
            self.hook("before", step)
            if self.activation is None:
                raise StepError("the accepted activation (activation.json) is missing")
            with self.lock:
                facts = copy.deepcopy(self.state.facts)
            context = StepContext(
                self.paths, self.config, self.runner, self.clock, self.activation, facts, step_log, tick
            )
            found = STEP_FUNCTIONS[step](context)
            self.hook("after", step)
        except Exception as err:  # a BaseException (power cut, stop) leaves the step running: redone later
            if isinstance(err, StepError):
                message = str(err)
            else:
                log.exception("step %s crashed", step)
                message = f"{type(err).__name__}: {err}"
            step_log.add(f"failed: {message}", logging.ERROR)
            self._finish(step, started, error=message, log_tail=step_log.tail())
            return
        self._finish(step, started, facts=found)

    def _finish(
        self,
        step: str,
        started: float,
        *,
        facts: dict[str, Any] | None = None,
        error: str | None = None,
        log_tail: list[str] | None = None,
    ) -> None:
        seconds = round(self.clock.monotonic() - started, 3)
        with self.lock:
            record = self.state.steps[step]
            record.finished = timestamp(self.clock.now())
            record.seconds = seconds
            self.state.current_step = None
            if error is None:
                record.status = DONE
                self.state.facts.update(facts or {})
            else:
                record.status = STEP_FAILED
                record.error = error
                self.state.failure = {"step": step, "error": error, "log_tail": log_tail or []}
                self._transition(FAILED)
            self._save()
        if error is None:
            log.info("step %s done in %.1f s", step, seconds)
        else:
            log.error("step %s failed after %.1f s: %s", step, seconds, error)

    def request_rerun(self, step: str) -> None:
        """Mark `step` and every later step pending; the daemon loop runs them (POST /steps/<step>/rerun)."""
        if step not in ALL_STEPS:
            raise UnknownStep(step)
        with self.lock:
            if self.state.state == WAITING:
                raise Conflict("not activated yet")
            if step not in self.state.steps:
                raise Conflict(f"{step} is not a step of the {self.state.role} role")
            if self.state.current_step is not None:
                raise Conflict(f"step {self.state.current_step} is running")
            order = self.state.ordered_steps()
            for later in order[order.index(step) :]:
                self.state.steps[later] = StepRecord()
            self.state.failure = None
            self._transition(phase_of(step))
            self._save()
        log.info("rerun requested from step %s", step)
        self.wake.set()

    def retry_failed(self) -> bool:
        """At daemon start, a failed step gets another go (a reboot is a natural retry)."""
        with self.lock:
            if self.state.state != FAILED or not self.state.failure:
                return False
            step = str(self.state.failure["step"])
            if step not in self.state.steps:
                return False
            self._transition(phase_of(step))
            self._save()
        log.info("retrying failed step %s", step)
        return True

    # -- facts and events

    def facts(self) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.state.facts)

    def step_done(self, step: str) -> bool:
        with self.lock:
            record = self.state.steps.get(step)
            return record is not None and record.status == DONE

    def record_ip_change(self, old: str, new: str) -> None:
        with self.lock:
            self.state.facts["node_ip"] = new
            event = {"time": timestamp(self.clock.now()), "kind": "ip-change", "old": old, "new": new}
            self.state.events.append(event)
            del self.state.events[:-MAX_HISTORY]
            self._save()

    def status(self) -> dict[str, Any]:
        """GET /status: the state, facts and history; never the token or the password hash."""
        with self.lock:
            view = copy.deepcopy(status_view(self.state))
            view["activation_error"] = self.activation_error
        view["addresses"] = netinfo.global_addresses(self.runner)
        view["version"] = __version__
        return view
