"""strata agent: rendering the apps' manifests and finding the workloads to wait for."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_fakes import activate_and_run, make_machine
from strata_agent.manifests import (
    ManifestError,
    Workload,
    discover_workloads,
    render_templates,
    workload_ready,
    write_rendered,
)

VALUES = {
    "hostname": "box1",
    "domain": "example.com",
    "node_ip": "10.0.0.5",
    "node_name": "box1-0123abcd",
    "admin_user": "olares",
    "gpu": "false",
}
MIXED = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: monitoring}
---
# only a comment
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: data}
---
apiVersion: helm.cattle.io/v1
kind: HelmChart
metadata: {name: hello, namespace: apps-system}
spec: {targetNamespace: strata-apps}
---
apiVersion: helm.cattle.io/v1
kind: HelmChart
metadata: {name: defaulted}
---
apiVersion: example.com/v1
kind: HelmChart
metadata: {name: not-k3s}
---
apiVersion: batch/v1
kind: Job
metadata: {name: plain-job}
"""


def test_workloads_from_multi_document_yaml_with_helmchart_jobs() -> None:
    assert discover_workloads([("strata-apps.yaml", MIXED)]) == [
        Workload("Deployment", "default", "web"),
        Workload("DaemonSet", "monitoring", "agent"),
        Workload("StatefulSet", "data", "db"),
        Workload("Job", "apps-system", "helm-install-hello"),
        Workload("Job", "kube-system", "helm-install-defaulted"),
    ]


def test_the_same_workload_in_two_files_is_waited_for_once() -> None:
    doc = "kind: Deployment\nmetadata: {name: web}\n"
    assert discover_workloads([("a.yaml", doc), ("b.yaml", doc)]) == [
        Workload("Deployment", "default", "web")
    ]


def test_invalid_yaml_names_the_file() -> None:
    with pytest.raises(ManifestError, match=r"^strata-broken\.yaml: not valid YAML"):
        discover_workloads([("strata-broken.yaml", "kind: [unclosed\n")])


def test_render_substitutes_and_names_targets(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text("host: ${hostname}.${domain}\nip: ${node_ip}\ngpu: ${gpu}\n")
    (tmp_path / "a.yaml").write_text("user: ${admin_user}\nnode: ${node_name}\n")
    (tmp_path / "notes.txt").write_text("${ignored}")
    assert render_templates(tmp_path, VALUES) == [
        ("strata-a.yaml", "user: olares\nnode: box1-0123abcd\n"),
        ("strata-b.yaml", "host: box1.example.com\nip: 10.0.0.5\ngpu: false\n"),
    ]


def test_missing_placeholder_names_file_and_placeholder(tmp_path: Path) -> None:
    (tmp_path / "10-ok.yaml").write_text("a: ${hostname}\n")
    (tmp_path / "20-app.yaml").write_text("a: ${hostname}\nb: ${cluster_name}\n")
    with pytest.raises(ManifestError) as err:
        render_templates(tmp_path, VALUES)
    assert str(err.value).startswith(
        "20-app.yaml: unknown placeholder ${cluster_name}; known: ${admin_user},"
    )


def test_shell_syntax_passes_through(tmp_path: Path) -> None:
    """Only ${lowercase} is ours: a container's shell script keeps $VAR, ${HOME}, $(cmd) and a lone $."""
    script = "args: ['echo $HOME ${PATH} $(date) 5$ $$ ${hostname}']\n"
    (tmp_path / "x.yaml").write_text(script)
    assert render_templates(tmp_path, VALUES) == [("strata-x.yaml", script.replace("${hostname}", "box1"))]


def test_missing_source_folder_renders_nothing(tmp_path: Path) -> None:
    assert render_templates(tmp_path / "absent", VALUES) == []


def test_unchanged_files_are_not_rewritten(tmp_path: Path) -> None:
    assert write_rendered(tmp_path, [("strata-a.yaml", "one\n"), ("strata-b.yaml", "two\n")]) == [
        "strata-a.yaml",
        "strata-b.yaml",
    ]
    inode = (tmp_path / "strata-a.yaml").stat().st_ino
    assert write_rendered(tmp_path, [("strata-a.yaml", "one\n"), ("strata-b.yaml", "2\n")]) == [
        "strata-b.yaml"
    ]
    assert (tmp_path / "strata-a.yaml").stat().st_ino == inode
    assert (tmp_path / "strata-b.yaml").read_text() == "2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strata-a.yaml", "strata-b.yaml"]  # no temp files


@pytest.mark.parametrize(
    ("kind", "obj", "ready"),
    [
        ("Deployment", {"spec": {"replicas": 2}, "status": {"readyReplicas": 2}}, True),
        ("Deployment", {"spec": {"replicas": 2}, "status": {"readyReplicas": 1}}, False),
        ("Deployment", {"spec": {}, "status": {}}, False),  # replicas default to 1
        ("Deployment", {"spec": {}, "status": {"readyReplicas": 1}}, True),
        ("Deployment", {"spec": {"replicas": 0}, "status": {}}, True),
        ("StatefulSet", {"spec": {"replicas": 3}, "status": {"readyReplicas": 3}}, True),
        ("StatefulSet", {"spec": {"replicas": 3}, "status": {"readyReplicas": 2}}, False),
        ("DaemonSet", {"status": {"desiredNumberScheduled": 0, "numberReady": 0}}, False),
        ("DaemonSet", {"status": {"desiredNumberScheduled": 2, "numberReady": 1}}, False),
        ("DaemonSet", {"status": {"desiredNumberScheduled": 2, "numberReady": 2}}, True),
        ("Job", {"status": {"active": 1}}, False),
        ("Job", {"status": {"succeeded": 1}}, True),
        ("Job", {"status": {"failed": 3}}, False),
    ],
)
def test_workload_readiness(kind: str, obj: dict[str, object], ready: bool) -> None:
    assert workload_ready(kind, obj) is ready


def test_write_manifests_step_fails_naming_file_and_placeholder(tmp_path: Path) -> None:
    machine = make_machine(tmp_path)
    (machine.root / "usr/share/strata/apps/30-extra.yaml").write_text("x: ${region}\n")
    agent, _ = machine.agent()
    assert activate_and_run(agent) == "failed"
    failed = machine.state()["failed"]
    assert failed["step"] == "write-manifests"
    assert failed["error"].startswith("30-extra.yaml: unknown placeholder ${region}; known:")
    # Nothing half-written: the first two rendered fine but are not written either.
    assert not (machine.root / "var/lib/rancher/k3s/server/manifests").exists()
