"""Unit tests for builder.apps: embedded charts, image discovery and the preloaded-images check."""

from __future__ import annotations

import base64
import gzip
import io
import tarfile
import textwrap
from pathlib import Path

import pytest
import yaml

from builder import LAYERS_DIR, build
from builder.apps import (
    chart_archive,
    chart_images,
    check_images,
    helmchart,
    manifest_images,
)
from builder.definition import load_definition
from builder.errors import StrataError
from tests.standins import k3s_standin

HELLO = LAYERS_DIR / "apps" / "builtin" / "hello"


def write_chart(folder: Path, template: str, values: str = "image: example/app:1\n") -> Path:
    (folder / "templates").mkdir(parents=True)
    (folder / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    (folder / "values.yaml").write_text(values)
    (folder / "templates" / "deploy.yaml").write_text(textwrap.dedent(template))
    return folder


def test_chart_archive_is_reproducible_and_helm_shaped(tmp_path: Path) -> None:
    chart = write_chart(tmp_path / "c", "image: {{ .Values.image }}\n")
    (chart / "strata-chart.yaml").write_text("namespace: x\n")
    first = chart_archive(chart)
    (chart / "values.yaml").touch()  # a new mtime changes nothing
    assert chart_archive(chart) == first
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(first))) as tar:
        names = tar.getnames()
    assert names == ["demo/Chart.yaml", "demo/templates/deploy.yaml", "demo/values.yaml"]


def test_chart_images_from_values_release_and_override(tmp_path: Path) -> None:
    chart = write_chart(
        tmp_path / "c",
        """\
        spec:
          containers:
            - name: a
              image: {{ .Values.image }}
            - name: b
              image: {{ .Values.other | quote }}
            - name: c
              image: "registry.local/{{ .Release.Name }}:{{ .Values.tag }}"
        """,
        values="image: example/app:1\nother: example/other:3\ntag: '2'\n",
    )
    found = chart_images(chart, "rel", "ns", {"image": "example/app:9"}, "charts[0]")
    assert found == ["example/app:9", "example/other:3", "registry.local/rel:2"]


def test_chart_image_it_cannot_read_names_file_and_line(tmp_path: Path) -> None:
    chart = write_chart(tmp_path / "c", 'spec:\n  image: {{ include "img" . }}\n')
    with pytest.raises(StrataError, match=r"charts\[0\]: templates/deploy.yaml:2: .*list the chart's images"):
        chart_images(chart, "rel", "ns", {}, "charts[0]")


def test_manifest_images_in_every_workload_kind() -> None:
    text = """\
    kind: Deployment
    spec: {template: {spec: {containers: [{name: a, image: one:1}], initContainers: [{image: two:2}]}}}
    ---
    kind: CronJob
    spec: {jobTemplate: {spec: {template: {spec: {containers: [{image: three:3}]}}}}}
    ---
    kind: ConfigMap
    data: {image: not-an-image}
    """
    assert manifest_images(textwrap.dedent(text), "m") == ["one:1", "two:2", "three:3"]


def test_manifest_with_bad_yaml_names_it() -> None:
    with pytest.raises(StrataError, match=r"layers\.apps\.manifests\[0\]: .*invalid YAML"):
        manifest_images("a: [b\n", "layers.apps.manifests[0]: x.yaml")


def test_missing_images_are_all_listed() -> None:
    files = [
        build.apps.AppFile("10-a.yaml", "", "a.yaml", ("docker.io/library/nginx:1", "localhost/x:1")),
        build.apps.AppFile("11-b.yaml", "", "chart b", ("redis:7",)),
    ]
    with pytest.raises(StrataError) as error:
        check_images(files, ["nginx:1"])
    message = str(error.value)
    assert "2 image(s)" in message and "layers.containerd.images" in message
    assert "localhost/x:1 (used by a.yaml)" in message and "redis:7 (used by chart b)" in message
    assert "nginx" not in message.split("\n", 1)[1]


def test_default_apps_use_only_preloaded_images() -> None:
    defn = load_definition(environ={})
    files = build.app_files(defn, build.image_specs(defn))
    assert [f.name for f in files] == ["10-strata-status.yaml", "11-hello.yaml"]
    assert files[0].images == ("localhost/strata/busybox:1.37",)
    assert files[1].images == ("localhost/strata/hello:2.10",)


def test_user_manifests_and_charts_join_the_builtin(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "web.yaml").write_text(
        "kind: Pod\nspec: {containers: [{image: localhost/strata/hello:2.10}]}\n"
    )
    (tmp_path / "m" / "notes.txt").write_text("ignored")
    write_chart(
        tmp_path / "chart", "image: {{ .Values.image }}\n", values="image: localhost/strata/busybox:1.37\n"
    )
    definition = tmp_path / "d.yaml"
    text = (Path(__file__).parents[2] / "definitions" / "default.yaml").read_text()
    definition.write_text(
        text + "  apps:\n    builtin: []\n    manifests: [m]\n"
        "    charts:\n      - {path: chart, name: mine, namespace: web, values: {x: '${hostname}'}}\n"
    )
    defn = load_definition(definition, environ={})
    files = build.app_files(defn, build.image_specs(defn))
    assert [f.name for f in files] == ["10-web.yaml", "11-mine.yaml"]
    chart = yaml.safe_load(files[1].text)
    assert chart["metadata"] == {"name": "mine", "namespace": "kube-system"}
    assert chart["spec"]["targetNamespace"] == "web"
    assert yaml.safe_load(chart["spec"]["valuesContent"]) == {"x": "${hostname}"}


def test_helmchart_embeds_the_chart() -> None:
    archive = chart_archive(HELLO)
    doc = yaml.safe_load(helmchart("hello", "apps", archive, {}))
    assert doc["apiVersion"] == "helm.cattle.io/v1" and doc["kind"] == "HelmChart"
    assert base64.b64decode(doc["spec"]["chartContent"]) == archive
    assert "valuesContent" not in doc["spec"]


def test_standin_renders_the_builtin_chart_like_discovery_reads_it() -> None:
    """Cross-check of the test stand-in: the Deployment it runs uses the image strata preloads."""
    doc = yaml.safe_load(helmchart("hello", "strata-apps", chart_archive(HELLO), {"greeting": "Hi box"}))
    rendered = k3s_standin.render_chart(doc)
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert [container["image"]] == chart_images(HELLO, "hello", "strata-apps", {}, "hello")
    assert deployment["metadata"] == {
        "name": "hello",
        "labels": deployment["metadata"]["labels"],
        "namespace": "strata-apps",
    }
    assert 'hello -g "Hi box"' in container["args"][0]
