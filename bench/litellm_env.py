"""LiteLLM's proxy, for the generation benchmark only: its own virtualenv, made on first use.

LiteLLM is never a dependency of fmapi: ``ensure()`` creates ``.fmapi/bench/litellm-venv`` (under
the git-ignored ``.fmapi/``) with ``python -m venv`` and pip-installs ``litellm[proxy]`` from PyPI
into it once; later runs reuse it. ``start()`` runs its proxy (``litellm --config``) in front of
OpenAI-compatible servers (``vllm serve``), one model entry each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("FMAPI_BENCH_LITELLM_VENV", ROOT / ".fmapi" / "bench" / "litellm-venv"))
# The pip requirement (override to pin a version, e.g. "litellm[proxy]==1.x").
REQUIREMENT = os.environ.get("FMAPI_BENCH_LITELLM_REQUIREMENT", "litellm[proxy]")
_MARKER = VENV / ".fmapi-bench-installed"
# LiteLLM's HTTP transport to the upstream: its default (aiohttp), or httpx with
# FMAPI_BENCH_LITELLM_AIOHTTP=0 (DISABLE_AIOHTTP_TRANSPORT). Measured with litellm 1.108.7 in
# front of vLLM serving the tiny model (a token every ~3 ms): with either one, the client gets
# the first token only when vLLM has sent its last (TTFT = the whole generation; 64 tokens:
# ~215 ms, 256 tokens: ~730 ms); with Gemma 3 270M (~90 ms a token) it streams token by token.
AIOHTTP = os.environ.get("FMAPI_BENCH_LITELLM_AIOHTTP", "1") not in ("0", "false", "no")


class LiteLLMUnavailable(RuntimeError):
    pass


def _base_python() -> str:
    """A python to make the venv from: the interpreter this venv was made from."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    return str(base) if base.exists() else sys.executable


def ensure(log=print) -> Path:
    """The LiteLLM venv's ``litellm`` executable, installing it first if needed."""
    exe = VENV / "bin" / "litellm"
    if _MARKER.exists() and exe.exists():
        return exe
    log(f"litellm: installing {REQUIREMENT} into {VENV} (benchmark only; once) ...")
    VENV.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log_path = VENV.parent / "litellm-install.log"
    try:
        with open(log_path, "wb") as out:
            if not (VENV / "bin" / "python").exists():
                subprocess.run([_base_python(), "-m", "venv", str(VENV)], check=True,
                               stdout=out, stderr=subprocess.STDOUT)
            pip = [str(VENV / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
            for args in (["install", "-U", "pip"], ["install", REQUIREMENT]):
                subprocess.run([*pip, *args], check=True, stdout=out, stderr=subprocess.STDOUT)
    except (subprocess.CalledProcessError, OSError) as exc:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:]) \
            if log_path.exists() else ""
        raise LiteLLMUnavailable(
            f"installing {REQUIREMENT} into {VENV} failed: {exc} (log {log_path}):\n{tail}") from None
    if not exe.exists():
        raise LiteLLMUnavailable(f"{exe} missing after installing {REQUIREMENT}")
    version = subprocess.run([str(VENV / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True, check=False).stdout.strip()
    _MARKER.write_text(version + "\n")
    log(f"litellm: {version} installed in {time.monotonic() - t0:.0f}s")
    return exe


def version() -> str:
    try:
        return _MARKER.read_text().strip()
    except OSError:
        return "?"


def config_yaml(models: dict[str, str]) -> str:
    """A proxy config: each served name -> the OpenAI-compatible base URL (``.../v1``) of a
    ``vllm serve`` serving it under that name (LiteLLM's ``hosted_vllm`` provider)."""
    lines = ["model_list:"]
    for name, api_base in models.items():
        lines += [f"  - model_name: {name}",
                  "    litellm_params:",
                  f"      model: hosted_vllm/{name}",
                  f"      api_base: {api_base}",
                  "      api_key: none",
                  "      timeout: 600",
                  "      stream_timeout: 600"]
    lines += ["litellm_settings:",
              "  telemetry: false",
              "  set_verbose: false",
              "  json_logs: false",
              "  request_timeout: 600",
              "general_settings:",
              "  disable_spend_logs: true",
              ""]
    return "\n".join(lines)


def start(sup, models: dict[str, str], workdir: Path, port: int, timeout: float = 300):
    """Start LiteLLM's proxy under supervisor ``sup`` on ``port``; returns (child, base URL,
    master key: the bearer token its clients send) once ``/health/liveliness`` answers."""
    import secrets

    exe = ensure()
    # It refuses to start without one (no database: the key is checked in memory).
    key = "sk-" + secrets.token_hex(32)
    cfg = workdir / "litellm.yaml"
    cfg.write_text(config_yaml(models))
    env = {"LITELLM_MASTER_KEY": key, "LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "NO_DOCS": "True",
           "DISABLE_ADMIN_UI": "True", "LITELLM_MODE": "PRODUCTION",
           # Its own venv only: nothing of fmapi's interpreter leaks in.
           "PYTHONPATH": "", "VIRTUAL_ENV": str(VENV),
           "PATH": f"{VENV / 'bin'}:{os.environ.get('PATH', '')}"}
    if not AIOHTTP:
        env["DISABLE_AIOHTTP_TRANSPORT"] = "True"
    child = sup.start("litellm", [str(exe), "--config", str(cfg), "--host", "127.0.0.1",
                                  "--port", str(port), "--num_workers", "1"], env,
                      cwd=str(workdir))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health/liveliness", timeout=2):
                return child, base, key
        except OSError:
            if not child.alive() or time.monotonic() > deadline:
                raise LiteLLMUnavailable(f"litellm proxy did not start:\n{child.tail(40)}")
            time.sleep(0.5)


if __name__ == "__main__":
    print(ensure())
