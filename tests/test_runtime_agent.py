"""The agent running runtime directories: load, score, time, generate, hashes, per-stage memory, storage."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime_genai")

from edgebuild.core import models  # noqa: E402
from edgebuild.core.errors import DeviceError  # noqa: E402
from edgebuild.device_agent import runtime_dir  # noqa: E402
from edgebuild.device_agent.genai_runtime import GenaiRuntime  # noqa: E402
from edgebuild.export.deployed import deployed_model  # noqa: E402
from edgebuild.export.encodings import RuntimePlan  # noqa: E402
from edgebuild.export.runtime_build import encode_stage  # noqa: E402
from edgebuild.targets.client import AgentClient, deploy_stage  # noqa: E402
from edgebuild.targets.local import LocalTransport  # noqa: E402

PROMPT = [1, 504, 3575, 282, 4649, 314, 77, 12]


@pytest.fixture(scope="module")
def tiny():
    return models.load(models.resolve("tiny-random"))


@pytest.fixture(scope="module")
def runtimes(tiny, tmp_path_factory):
    model, tok = tiny
    root = tmp_path_factory.mktemp("runtimes")
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for name in ("int4", "fp32"):
        encode_stage(model, tok, root / name, RuntimePlan(name, name), state=state)
    return {"int4": root / "int4", "fp32": root / "fp32"}


@pytest.fixture
def agent(tmp_path):
    transport = LocalTransport(tmp_path / "agent", stop_timeout_s=2.0)
    client = AgentClient(transport, timeout_s=120)
    client.hello("local")
    yield client, transport
    client.close()
    transport.close()


def _deploy(client, transport, folder, name="int4", version="v1", **args) -> dict:
    files = (runtime_dir.upload_files(folder) if runtime_dir.is_runtime_dir(folder)
             else {p.name: p for p in sorted(folder.iterdir()) if p.is_file()})
    if args:
        entries = []
        for as_name, path in files.items():
            entries.append({"path": transport.upload(path, f"{version}.{as_name}"), "as": as_name,
                            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
        return client.call("stage", {"name": name, "version": version, "files": entries, **args})
    return deploy_stage(client, transport, name, version, files)


def test_load_score_time_generate_a_runtime_directory(agent, runtimes, tiny):
    client, transport = agent
    model, tok = tiny
    manifest = runtime_dir.read_manifest(runtimes["int4"])
    _deploy(client, transport, runtimes["int4"])
    loaded = client.load("int4", "v1", threads=1)
    assert loaded["format"] == "runtime"
    assert loaded["weights_sha256"] == manifest["weights_sha256"]
    assert loaded["weights_sha256"] == runtime_dir.sha256_file(runtimes["int4"] / runtime_dir.WEIGHTS)

    requests = [(PROMPT[:5], PROMPT[5:]), (PROMPT[:5], [9, 10]), (PROMPT[:3], [42])]
    scores = client.score(requests)
    local = GenaiRuntime.load(runtimes["int4"], threads=1)
    assert np.allclose([s[0] for s in scores], [s[0] for s in local.score(requests)], atol=1e-4)
    deployed = deployed_model(model, runtimes["int4"])
    with torch.no_grad():
        logprobs = torch.log_softmax(deployed(torch.tensor([PROMPT])).logits[0], -1)
    expected = float(sum(logprobs[i - 1, PROMPT[i]] for i in range(5, len(PROMPT))))
    assert scores[0][0] == pytest.approx(expected, abs=0.05)

    samples = client.time(prompt_len=16, decode_tokens=4, warmup=0, repeats=2)
    assert len(samples["prefill_ms"]) == 2 and all(v > 0 for v in samples["decode_ms_per_token"])
    tokens = client.call("generate", {"input_ids": PROMPT, "max_new_tokens": 6})["tokens"]
    assert tokens == local.greedy(PROMPT, 6)[0]


def test_each_stage_is_measured_alone_in_a_fresh_process(agent, runtimes):
    client, transport = agent
    _deploy(client, transport, runtimes["fp32"], "fp32", "v1")
    _deploy(client, transport, runtimes["int4"], "int4", "v1")
    client.load("fp32", "v1", threads=1)        # the agent itself now holds the larger model
    big = client.call("measure", {"name": "fp32", "version": "v1", "threads": 1, "decode_tokens": 2,
                                  "repeats": 1, "warmup": 0})
    small = client.call("measure", {"name": "int4", "version": "v1", "threads": 1, "decode_tokens": 2,
                                    "repeats": 1, "warmup": 0})
    agent_pid = client.agent_hello["pid"]
    assert len({agent_pid, big["pid"], small["pid"]}) == 3
    assert small["peak_rss_mb"] < big["peak_rss_mb"] - 10      # not the larger stage's peak
    assert small["stage_rss_mb"] < big["stage_rss_mb"]
    for result, name in ((big, "fp32"), (small, "int4")):
        folder = runtimes[name]
        assert result["weights_sha256"] == runtime_dir.read_manifest(folder)["weights_sha256"]
        assert result["stored_bytes"] >= runtime_dir.read_manifest(folder)["runtime_bytes"]
        assert result["load_s"] > 0 and len(result["decode_ms_per_token"]) == 1


def test_a_corrupted_upload_is_refused_at_load_naming_the_file(agent, runtimes):
    client, transport = agent
    staged = _deploy(client, transport, runtimes["int4"])
    weights = f"{staged['path']}/{runtime_dir.WEIGHTS}"
    with open(weights, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DeviceError, match=rf"{runtime_dir.WEIGHTS}: truncated \(1000 bytes"):
        client.load("int4", "v1")


def test_ops_reports_the_devices_onnxruntime_kernels(agent):
    client, _ = agent
    ops = client.call("ops", {"ops": ["MatMulNBits", "GatherBlockQuantized"]})
    assert ops["onnxruntime"] and ops["onnxruntime_genai"]
    assert {k["op"] for k in ops["kernels"]} == {"MatMulNBits", "GatherBlockQuantized"}


def _fake(tmp_path, name: str, size: int):
    folder = tmp_path / f"fake-{name}-{size}"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(bytes(size))
    return folder


def _versions(root) -> dict:
    return {p.name: sorted(v.name for v in p.iterdir() if not v.name.startswith(".")) for p in (root / "stages").iterdir()}


def test_storage_keeps_the_active_and_previous_versions_within_the_budget(agent, tmp_path):
    client, transport = agent
    root = tmp_path / "agent"
    _deploy(client, transport, _fake(tmp_path, "v1", 1000), "int4", "v1")
    client.activate("int4", "v1")
    staged = [_deploy(client, transport, _fake(tmp_path, v, 1000), "int4", v) for v in ("v2", "v3", "v4")]
    assert [s["storage"]["pruned"] for s in staged] == [[], [], ["int4/v2"]]
    assert _versions(root) == {"int4": ["v1", "v3", "v4"]}       # newest two, and the active one
    client.activate("int4", "v4")                                 # v1 is now what a rollback returns to
    assert client.call("prune", {"budget_bytes": 2500})["pruned"] == ["int4/v3"]
    assert _versions(root) == {"int4": ["v1", "v4"]}
    result = _deploy(client, transport, _fake(tmp_path, "v5", 1000), "int4", "v5", budget_bytes=5000)
    assert result["storage"]["stored_bytes"] <= 5000 and not result["storage"]["over_budget"]
    with pytest.raises(DeviceError, match=r"int4/v6 does not fit the storage budget of 2500 bytes"):
        _deploy(client, transport, _fake(tmp_path, "v6", 2000), "int4", "v6", budget_bytes=2500)
    assert _versions(root) == {"int4": ["v1", "v4", "v5"]}       # the refusal removed nothing else
    assert client.rollback()["active"] == {"name": "int4", "version": "v1"}
