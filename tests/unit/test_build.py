"""Phase bookkeeping: assemble only runs on a tree that a finished prepare made for this definition."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from builder import build
from builder.definition import Definition, load_definition
from builder.errors import StrataError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="assemble checks for root first")


@pytest.fixture
def defn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Definition:
    monkeypatch.setenv("STRATA_ARTIFACTS", str(tmp_path))
    d = load_definition()
    (build.work_dir(d) / "rootfs").mkdir(parents=True)
    return d


def test_interrupted_prepare_is_not_taken_for_done(defn: Definition) -> None:
    build.record_phase(defn, "prepare", 1.0)
    build.forget_phase(defn, "prepare")  # what a rerun of prepare does first
    with pytest.raises(StrataError, match="nothing prepared"):
        build.assemble(defn)
    assert not build.output_dir(defn).exists()


def test_prepare_for_another_definition_is_refused(defn: Definition) -> None:
    build.record_phase(defn, "prepare", 1.0)
    state_file = build.work_dir(defn) / "state.json"
    state = json.loads(state_file.read_text())
    state["definition_digest"] = "0" * 64
    state_file.write_text(json.dumps(state))
    with pytest.raises(StrataError, match="definition changed"):
        build.assemble(defn)


def test_phase_timings_are_kept(defn: Definition) -> None:
    build.record_phase(defn, "download", 2.5)
    build.record_phase(defn, "prepare", 7.25)
    phases = build.load_state(defn)["phases"]
    assert phases["download"]["seconds"] == 2.5 and phases["prepare"]["seconds"] == 7.2
    assert build.load_state(defn)["definition_digest"] == defn.tree_digest()


def test_output_settings_do_not_invalidate_the_prepared_tree(defn: Definition) -> None:
    """Formats, ISO and verify settings change no byte of the tree; os and layer settings do."""
    base = defn.tree_digest()
    defn.data["disk"]["formats"] = ["qcow2"]
    defn.data["verify"]["memory"] = 4096
    assert defn.tree_digest() == base
    defn.data["os"]["hostname"] = "elsewhere"
    assert defn.tree_digest() != base
