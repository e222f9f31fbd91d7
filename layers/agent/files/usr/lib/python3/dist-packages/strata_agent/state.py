"""The agent's state machine and its record in state.json (rewritten atomically after every change)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fsutil import write_json

log = logging.getLogger(__name__)

WAITING = "waiting-for-activation"
ACTIVATING = "activating"
STARTING = "starting-orchestration"
DEPLOYING = "deploying"
READY = "ready"
FAILED = "failed"
STATES = (WAITING, ACTIVATING, STARTING, DEPLOYING, READY, FAILED)

# The steps of each working state, in order.
PHASES: dict[str, tuple[str, ...]] = {
    ACTIVATING: ("hostname", "admin-user", "identity", "node-ip", "gpu"),
    STARTING: ("k3s-config", "start-k3s", "wait-node"),
    DEPLOYING: ("write-manifests", "wait-workloads"),
}
ALL_STEPS = tuple(step for steps in PHASES.values() for step in steps)

SERVER = "server"
AGENT = "agent"

PENDING = "pending"
RUNNING = "running"
DONE = "done"
STEP_FAILED = "failed"

MAX_HISTORY = 200


def phase_of(step: str) -> str:
    for phase, steps in PHASES.items():
        if step in steps:
            return phase
    raise KeyError(step)


def steps_for_role(role: str) -> tuple[str, ...]:
    """A K3s agent (joining a cluster) deploys nothing: it is ready once its node is."""
    return ALL_STEPS if role == SERVER else PHASES[ACTIVATING] + PHASES[STARTING]


def timestamp(unix: float) -> str:
    """ISO 8601 UTC, to the second."""
    moment = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class StepRecord:
    status: str = PENDING
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "started": self.started,
            "finished": self.finished,
            "seconds": self.seconds,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepRecord:
        return cls(
            status=data.get("status", PENDING),
            started=data.get("started"),
            finished=data.get("finished"),
            seconds=data.get("seconds"),
            error=data.get("error"),
        )


@dataclass
class AgentState:
    state: str = WAITING
    role: str | None = None
    current_step: str | None = None
    steps: dict[str, StepRecord] = field(default_factory=dict)
    failure: dict[str, Any] | None = None  # {"step", "error", "log_tail"}
    activation: dict[str, Any] | None = None  # the activation without its secrets
    facts: dict[str, Any] = field(default_factory=dict)  # what the steps found and decided
    events: list[dict[str, Any]] = field(default_factory=list)
    transitions: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "state": self.state,
            "role": self.role,
            "current_step": self.current_step,
            "steps": {name: record.to_json() for name, record in self.steps.items()},
            "failed": self.failure,
            "activation": self.activation,
            "facts": self.facts,
            "events": self.events,
            "transitions": self.transitions,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentState:
        state = data.get("state", WAITING)
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        return cls(
            state=state,
            role=data.get("role"),
            current_step=data.get("current_step"),
            steps={name: StepRecord.from_json(rec) for name, rec in (data.get("steps") or {}).items()},
            failure=data.get("failed"),
            activation=data.get("activation"),
            facts=dict(data.get("facts") or {}),
            events=list(data.get("events") or []),
            transitions=list(data.get("transitions") or []),
        )

    def ordered_steps(self) -> list[str]:
        return [step for step in ALL_STEPS if step in self.steps]


class StateStore:
    """state.json: loaded once at start, saved whole after every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> AgentState:
        try:
            data = json.loads(self.path.read_text())
            return AgentState.from_json(data)
        except FileNotFoundError:
            return AgentState()
        except (ValueError, TypeError, AttributeError) as err:
            # Atomic writes make this unlikely; keep the evidence and start over (every step is idempotent).
            kept = self.path.with_name(f"{self.path.name}.corrupt-{os.getpid()}")
            os.replace(self.path, kept)
            log.error("state.json is unreadable (%s); kept as %s, starting from scratch", err, kept.name)
            return AgentState()

    def save(self, state: AgentState) -> None:
        with self._lock:
            write_json(self.path, state.to_json())


def status_view(state: AgentState) -> dict[str, Any]:
    """What GET /status shows of the state: never a token or a password hash (state.json holds none)."""
    facts = state.facts
    return {
        "state": state.state,
        "role": state.role,
        "current_step": state.current_step,
        "steps": [
            {"name": name, "phase": phase_of(name), **state.steps[name].to_json()}
            for name in state.ordered_steps()
        ],
        "failed": state.failure,
        "hostname": facts.get("hostname"),
        "domain": facts.get("domain"),
        "node_name": facts.get("node_name"),
        "node_ip": facts.get("node_ip"),
        "gpu": facts.get("gpu"),
        "workloads": facts.get("workloads", []),
        "activation": state.activation,
        "activation_source": (state.activation or {}).get("source"),
        "events": state.events,
        "transitions": state.transitions,
    }
