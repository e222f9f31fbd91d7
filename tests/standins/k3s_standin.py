#!/usr/bin/python3
"""k3s_standin: a TEST STAND-IN for the K3s binary. It is not K3s and no default build uses it.

K3s release binaries cannot be downloaded where strata's tests run, so the tests serve this file from a
local mirror on 127.0.0.1 as `<version>/k3s`, pinned by its own sha256, and build an image with it.
Everything around it is real: download, checksum, install, containerd, strata-agent and its API.

It implements only what the image and strata-agent use:
  k3s --version
  k3s server | k3s agent         systemd Type=notify; reads /etc/rancher/k3s/config.yaml{,.d/*.yaml}
  k3s kubectl get node NAME -o json
  k3s kubectl get deployment|daemonset|statefulset|job -n NS NAME -o json
  kubectl ...                     the same, through the kubectl link
The server "deploys" K3s' auto-deploy manifests: each container of a Deployment, DaemonSet or
StatefulSet runs through the real containerd (`ctr -n k8s.io run --net-host`, one replica); a HelmChart
with an embedded chart (chartContent) is unpacked and its templates rendered for `.Values.*`,
`.Release.Name`, `.Release.Namespace` and `.Chart.Name` only. There is no API server, scheduler,
kubelet, CNI, pod sandbox or kubeconfig.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from typing import Any

import yaml

VERSION = "v0.0.0-standin"
CONFIG = "/etc/rancher/k3s/config.yaml"
MANIFESTS = "/var/lib/rancher/k3s/server/manifests"
STORE = "/var/lib/rancher/k3s/standin"
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")
KINDS = {
    "node": "Node", "nodes": "Node", "no": "Node",
    "deployment": "Deployment", "deployments": "Deployment", "deploy": "Deployment",
    "daemonset": "DaemonSet", "daemonsets": "DaemonSet", "ds": "DaemonSet",
    "statefulset": "StatefulSet", "statefulsets": "StatefulSet", "sts": "StatefulSet",
    "job": "Job", "jobs": "Job",
}  # fmt: skip


def log(message: str) -> None:
    print(f"k3s-standin: {message}", file=sys.stderr, flush=True)


def load_config() -> dict[str, Any]:
    config: dict[str, Any] = {}
    for path in [CONFIG, *sorted(glob.glob(CONFIG + ".d/*.yaml"))]:
        if os.path.exists(path):
            with open(path) as f:
                config.update(yaml.safe_load(f) or {})
    return config


def object_path(kind: str, namespace: str, name: str) -> str:
    return os.path.join(STORE, "objects", kind, namespace or "_", name + ".json")


def store(obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    path = object_path(obj["kind"], meta.get("namespace", ""), meta["name"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def notify_ready() -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", address)


# ---------------------------------------------------------------- charts


def _read(archive: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    reader = archive.extractfile(member)
    assert reader is not None
    return reader.read().decode()


def render_chart(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The documents an embedded chart's templates render to (the few expressions listed above)."""
    spec = doc.get("spec", {})
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(spec["chartContent"]))) as archive:
        files = {m.name.split("/", 1)[1]: _read(archive, m) for m in archive if m.isfile()}
    values = yaml.safe_load(files.get("values.yaml", "")) or {}
    values.update(yaml.safe_load(spec.get("valuesContent", "")) or {})
    chart = yaml.safe_load(files["Chart.yaml"])
    scope = {
        "Values": values,
        "Release": {"Name": doc["metadata"]["name"], "Namespace": spec.get("targetNamespace", "default")},
        "Chart": {"Name": chart["name"], "Version": chart.get("version", "")},
    }

    def value(match: re.Match[str]) -> str:
        expression, _, pipe = match.group(1).partition("|")
        current: Any = scope
        for part in expression.strip().lstrip(".").split("."):
            current = current[part]
        text = str(current)
        return json.dumps(text) if pipe.strip() == "quote" else text

    docs = []
    for name in sorted(files):
        if name.startswith("templates/") and name.endswith((".yaml", ".yml")):
            rendered = re.sub(r"\{\{-?\s*(.+?)\s*-?\}\}", value, files[name])
            docs += [d for d in yaml.safe_load_all(rendered) if d]
    for rendered_doc in docs:
        rendered_doc.setdefault("metadata", {}).setdefault("namespace", scope["Release"]["Namespace"])
    return docs


# ---------------------------------------------------------------- containers


def ctr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ctr", "-n", "k8s.io", *args], capture_output=True, text=True)


def running_tasks() -> set[str]:
    out = ctr("tasks", "ls").stdout.splitlines()[1:]
    return {line.split()[0] for line in out if line.split()[-1] == "RUNNING"}


def start_container(cid: str, container: dict[str, Any]) -> None:
    ctr("tasks", "kill", "-s", "SIGKILL", cid)
    ctr("tasks", "rm", "-f", cid)
    ctr("containers", "rm", cid)
    env = [f"--env={e['name']}={e.get('value', '')}" for e in container.get("env", []) if "name" in e]
    argv = [*container.get("command", []), *container.get("args", [])]
    out = ctr("run", "-d", "--net-host", *env, container["image"], cid, *argv)
    log(f"started {cid} from {container['image']}" if out.returncode == 0 else f"{cid}: {out.stderr}")


def workload_status(doc: dict[str, Any], ready: bool) -> dict[str, Any]:
    if doc["kind"] == "DaemonSet":
        return {"desiredNumberScheduled": 1, "numberReady": 1 if ready else 0}
    replicas = doc.get("spec", {}).get("replicas", 1)
    return {"replicas": replicas, "readyReplicas": replicas if ready else 0}


def reconcile(docs: list[dict[str, Any]]) -> None:
    running = running_tasks()
    for doc in docs:
        meta = doc["metadata"]
        ns, name = meta.get("namespace", "default"), meta["name"]
        containers = doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        ids = [f"{ns}.{name}.{c['name']}" for c in containers]
        for cid, container in zip(ids, containers, strict=True):
            if cid not in running:
                start_container(cid, container)
        time.sleep(0.5)
        running = running_tasks()
        ready = all(cid in running for cid in ids)
        store({**doc, "metadata": {**meta, "namespace": ns}, "status": workload_status(doc, ready)})


def deployed_documents() -> list[dict[str, Any]]:
    workloads = []
    for path in sorted(glob.glob(MANIFESTS + "/*.yaml")):
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            if doc.get("kind") == "HelmChart":
                ns = doc["metadata"].get("namespace", "kube-system")
                job = {"kind": "Job", "metadata": {"name": f"helm-install-{doc['metadata']['name']}"}}
                try:
                    rendered = render_chart(doc)
                except Exception as exc:
                    log(f"chart {doc['metadata']['name']}: {exc!r}")
                    store({**job, "metadata": {**job["metadata"], "namespace": ns}, "status": {"failed": 1}})
                    continue
                store({**job, "metadata": {**job["metadata"], "namespace": ns}, "status": {"succeeded": 1}})
                workloads += [d for d in rendered if d.get("kind") in WORKLOADS]
            elif doc.get("kind") in WORKLOADS:
                workloads.append(doc)
    return workloads


def serve(role: str) -> None:
    config = load_config()
    name = config.get("node-name") or socket.gethostname()
    labels = {"kubernetes.io/hostname": name}
    for label in config.get("node-label", []):
        key, _, val = label.partition("=")
        labels[key] = val
    node = {
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "addresses": [{"type": "InternalIP", "address": config.get("node-ip", "")}],
            "nodeInfo": {"kubeletVersion": VERSION},
        },
    }
    store(node)
    log(f"{role} ready as node {name} (ip {config.get('node-ip')}, server {config.get('server', '-')})")
    notify_ready()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    seen = ""
    while True:
        if role == "server":
            digest = hashlib.sha256()
            for path in sorted(glob.glob(MANIFESTS + "/*.yaml")):
                with open(path, "rb") as f:
                    digest.update(f.read())
            if digest.hexdigest() != seen:
                log("applying manifests")
                seen = digest.hexdigest()
            reconcile(deployed_documents())
        time.sleep(3)


# ---------------------------------------------------------------- kubectl


def kubectl(args: list[str]) -> int:
    namespace, output, rest = "default", "", []
    i = 0
    while i < len(args):
        if args[i] in ("-n", "--namespace"):
            namespace, i = args[i + 1], i + 2
        elif args[i] == "-o":
            output, i = args[i + 1], i + 2
        else:
            rest.append(args[i])
            i += 1
    if len(rest) != 3 or rest[0] != "get" or rest[1] not in KINDS:
        print(f"error: the K3s stand-in supports only `kubectl get KIND NAME`, not {args}", file=sys.stderr)
        return 2
    kind, name = KINDS[rest[1]], rest[2]
    path = object_path(kind, "" if kind == "Node" else namespace, name)
    if not os.path.exists(path):
        print(f'Error from server (NotFound): {rest[1]} "{name}" not found', file=sys.stderr)
        return 1
    with open(path) as f:
        obj = json.load(f)
    print(json.dumps(obj, indent=2) if output == "json" else f"{kind}/{name}")
    return 0


def main(argv: list[str]) -> int:
    program = os.path.basename(argv[0])
    if program == "kubectl":
        return kubectl(argv[1:])
    command = argv[1] if len(argv) > 1 else ""
    if command in ("--version", "-v", "version"):
        print(f"k3s version {VERSION} (strata test stand-in, not K3s)")
        return 0
    if command in ("server", "agent"):
        serve(command)
        return 0
    if command == "kubectl":
        return kubectl(argv[2:])
    print(f"k3s stand-in: unsupported command {argv[1:]}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
