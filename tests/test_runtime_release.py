"""A release runs on a device that has only the agent: a fresh venv with the agent's wheel and its
runtime dependencies, ``python -m edgebuild.device_agent generate --package``."""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime_genai")

from edgebuild.build.package import build_runtime_package, verify  # noqa: E402
from edgebuild.core import models  # noqa: E402
from edgebuild.core.paths import edgebuild_home  # noqa: E402
from edgebuild.export.encodings import RuntimePlan  # noqa: E402
from edgebuild.export.runtime_build import encode_stage  # noqa: E402

AGENT_DIR = Path(__file__).resolve().parents[1] / "device_agent"
RUNTIME = ("numpy", "onnxruntime", "onnxruntime-genai")


def _pip(*args, python=sys.executable, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout)


def _wheelhouse(tmp_path) -> Path:
    """The agent's wheel and the wheels of its runtime dependencies, at the versions installed here
    (kept under EDGEBUILD_HOME so a second run needs no download)."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in RUNTIME]
    cache = edgebuild_home() / "wheels" / "agent-runtime"
    if _pip("download", "--only-binary=:all:", "-d", str(cache), *pins).returncode != 0:
        pytest.skip(f"cannot get the wheels of {', '.join(pins)} (offline and not cached in {cache})")
    house = tmp_path / "wheels"
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(house), str(AGENT_DIR))
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    for wheel in cache.glob("*.whl"):
        (house / wheel.name).symlink_to(wheel)
    return house


def test_generate_streams_from_a_release_with_only_the_agent_installed(tmp_path):
    model, tok = models.load(models.resolve("tiny-random"))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    encode_stage(model, tok, tmp_path / "runtime", RuntimePlan("int4", "int4"), state=state)
    package = build_runtime_package(tmp_path / "runtime", tmp_path / "release", "edgebuild-tiny-int4")
    assert verify(package)["name"] == "edgebuild-tiny-int4"

    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    installed = _pip("install", "--no-index", "--find-links", str(_wheelhouse(tmp_path)),
                     "edgebuild-agent[runtime]", python=python)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0                              # only the agent and its runtime

    prompt = "Once upon a time"
    done = subprocess.run([str(python), "-m", "edgebuild.device_agent", "generate", "--package",
                           str(package), prompt, "--max-new-tokens", "12", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(prompt) and len(done.stdout) > len(prompt)
    assert re.search(r"\[12 tokens, [\d.]+ tokens/s decode, [\d.]+ tokens/s overall\]", done.stderr)


def test_generate_refuses_a_folder_without_a_runtime_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "edgebuild.device_agent", "generate", "--package",
                           str(tmp_path), "hi"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert f"{tmp_path}: no runtime package here" in done.stderr
