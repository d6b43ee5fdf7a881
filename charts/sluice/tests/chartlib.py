"""Shared helpers of the chart checks: locating the chart and rendering it.

Rendering uses helm-python-sdk, which embeds the Helm v4 engine as a shared
library, so no `helm` binary is needed and nothing is contacted: `lookup`
returns nothing and .Capabilities are Helm's built-in defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

CHART_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = CHART_DIR.parent.parent

RELEASE_NAME = "sluice"
RELEASE_NAMESPACE = "sluice-system"


def corpus_dir() -> Path:
    """Cilium reference corpus, read in place beside the repository."""
    override = os.environ.get("SLUICE_CORPUS_DIR")
    if override:
        return Path(override)
    return REPO_ROOT.parent / "shared" / "corpus" / "cec"


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Render the chart; returns {template path: manifest text}.

    Raises helm_python.HelmError (e.g. HelmValuesError for values that
    values.schema.json rejects, HelmRenderError for a `fail` in a template).
    """
    import helm_python as helm

    with helm.Chart.load(str(CHART_DIR)) as chart:
        return chart.render(
            values=values or {},
            name=RELEASE_NAME,
            namespace=RELEASE_NAMESPACE,
            is_install=True,
        )


def manifests(rendered: dict[str, str]) -> dict[str, str]:
    """Only the Kubernetes manifests: drops NOTES.txt and partials."""
    return {
        path: text
        for path, text in rendered.items()
        if path.endswith((".yaml", ".yml")) and not Path(path).name.startswith("_")
    }


def objects(rendered: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """Every non-empty YAML document of the rendered manifests, with its template path."""
    out: list[tuple[str, dict[str, Any]]] = []
    for path, text in sorted(manifests(rendered).items()):
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append((path, doc))
    return out


def find(rendered: dict[str, str], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """Rendered objects of one kind (and name, if given)."""
    return [
        obj
        for _, obj in objects(rendered)
        if obj.get("kind") == kind and (name is None or obj["metadata"]["name"] == name)
    ]
