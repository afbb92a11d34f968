"""The device agent, driven through the local transport and the host's client."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgebuild.core.errors import DeviceError, ExitCode
from edgebuild.device_agent import protocol, sysinfo
from edgebuild.device_agent.server import MANIFEST
from edgebuild.targets.client import AgentClient, deploy_stage
from edgebuild.targets.local import LocalTransport

AGENT_DIR = Path(__file__).resolve().parents[1] / "device_agent"


@pytest.fixture
def root(tmp_path):
    return tmp_path / "agent"


@pytest.fixture
def transport(root):
    t = LocalTransport(root, stop_timeout_s=2.0)
    yield t
    t.close()


@pytest.fixture
def client(transport):
    c = AgentClient(transport, timeout_s=30)
    yield c
    c.close()


def _upload(transport, tmp_path, name: str, data: bytes, sha: str | None = None) -> dict:
    src = tmp_path / f"src-{name}"
    src.write_bytes(data)
    return {"path": transport.upload(src, name), "as": name,
            "sha256": sha or hashlib.sha256(data).hexdigest()}


def _stage(client, transport, tmp_path, name: str, version: str) -> dict:
    files = [_upload(transport, tmp_path, f"{name}.{version}.w", f"{name}/{version}".encode())]
    files[0]["as"] = "weights.ebpk"
    return client.stage(name, version, files)


def _fake_agent(root, code: str, **kw) -> LocalTransport:
    """A transport whose 'agent' is a short Python program (to misbehave on purpose)."""
    return LocalTransport(root, command=[sys.executable, "-c", code], **kw)


# --- hello and info ---------------------------------------------------------------------

def test_hello_reports_versions_and_records_the_target(client, root):
    first = client.hello("rpi4")
    assert first["protocol"] == protocol.PROTOCOL_VERSION
    assert first["agent_version"] == protocol.AGENT_VERSION
    assert (first["target"], first["recorded_target"]) == ("rpi4", None)
    assert json.loads((root / "target.json").read_text())["target"] == "rpi4"
    assert client.hello("rpi5")["recorded_target"] == "rpi4"


def test_hello_refuses_another_protocol_major_and_keeps_serving(client):
    with pytest.raises(DeviceError, match=r"VersionMismatch: host speaks agent protocol 2") as err:
        client.call("hello", {"protocol": 2})
    assert err.value.exit_code == ExitCode.DEVICE
    with pytest.raises(DeviceError, match=r"VersionMismatch: protocol version 'x.1' is not MAJOR"):
        client.call("hello", {"protocol": "x.1"})
    assert client.call("hello", {"protocol": "1.0"})["protocol"] == protocol.PROTOCOL_VERSION
    assert client.call("hello", {"protocol": 1})["protocol"] == "1.2"
    assert client.hello()["protocol"] == protocol.PROTOCOL_VERSION


def test_hello_lists_the_commands_and_the_client_remembers_them(client):
    hello = client.hello()
    assert {"score", "activate", "rollback", "load", "time"} <= set(hello["commands"])
    assert client.supports("score") and client.supports("measure")
    assert not client.supports("train")


def test_protocol_versions_parse_as_major_minor():
    assert protocol.parse_version("1.1") == (1, 1) and protocol.parse_version(2) == (2, 0)
    for bad in ("1.2.3", "", True, "one"):
        with pytest.raises(protocol.VersionMismatch):
            protocol.parse_version(bad)


def test_client_refuses_an_agent_of_another_protocol(tmp_path):
    code = ("import json, sys\nreq = json.loads(sys.stdin.readline())\n"
            "print(json.dumps({'id': req['id'], 'ok': True, 'result': {'protocol': 7}}), flush=True)\n"
            "sys.stdin.readline()\n")
    with AgentClient(_fake_agent(tmp_path, code), timeout_s=10) as client:
        with pytest.raises(DeviceError, match="agent speaks agent protocol 7"):
            client.hello()


def test_info_reports_device_facts(client, root):
    info = client.info()
    assert info["arch"] == sysinfo.arch() and info["arch"] != "arm64"
    assert info["cores"] >= 1 and info["ram_total_mb"] > 0 and info["ram_available_mb"] > 0
    assert info["disk_free_mb"] > 0
    assert info["python"] == platform.python_version()
    assert info["onnxruntime"] == sysinfo.package_version("onnxruntime")
    assert {"cpu_temp_c", "throttled", "machine"} <= set(info)
    assert info["stages"] == {} and info["root"] == str(root)


def test_throttled_flags_are_decoded():
    decoded = sysinfo.parse_throttled("throttled=0x50005\n")
    assert decoded["flags"] == ["under-voltage", "throttled", "under-voltage-occurred",
                                "throttling-occurred"]
    assert decoded["throttled_now"] is True
    assert sysinfo.parse_throttled("error") is None


# --- stage ------------------------------------------------------------------------------

def test_stage_installs_verified_files_and_empties_incoming(client, transport, tmp_path, root):
    files = [_upload(transport, tmp_path, "graph.json", b'{"format": 1}'),
             _upload(transport, tmp_path, "weights.ebpk", b"\x00" * 4096)]
    result = client.stage("rtn", "v1", files)
    stage_dir = root / "stages" / "rtn" / "v1"
    assert result["path"] == str(stage_dir) and result["existing"] is False
    assert (stage_dir / "weights.ebpk").read_bytes() == b"\x00" * 4096
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    assert manifest["files"]["graph.json"]["sha256"] == files[0]["sha256"]
    assert list((root / "incoming").iterdir()) == []
    assert client.info()["stages"] == {"rtn": ["v1"]}


def test_stage_is_idempotent_but_a_version_is_immutable(client, transport, tmp_path):
    client.stage("rtn", "v1", [_upload(transport, tmp_path, "w", b"one")])
    again = client.stage("rtn", "v1", [_upload(transport, tmp_path, "w", b"one")])
    assert again["existing"] is True
    with pytest.raises(DeviceError, match="already exists with different files"):
        client.stage("rtn", "v1", [_upload(transport, tmp_path, "w", b"two")])


def test_sha256_mismatch_is_refused_and_leaves_no_partial_stage(client, transport, tmp_path, root):
    good = _upload(transport, tmp_path, "graph.json", b"graph")
    bad = _upload(transport, tmp_path, "weights.ebpk", b"weights", sha="0" * 64)
    with pytest.raises(DeviceError, match=r"StageError: sha256 of weights.ebpk .* expected 0{64}"):
        client.stage("rtn", "v1", [good, bad])
    assert list((root / "stages").iterdir()) == []
    assert sorted(p.name for p in (root / "incoming").iterdir()) == ["graph.json", "weights.ebpk"]
    bad["sha256"] = hashlib.sha256(b"weights").hexdigest()
    assert client.stage("rtn", "v1", [good, bad])["existing"] is False


@pytest.mark.parametrize("field, value", [
    ("name", "../evil"), ("name", ".hidden"), ("version", ".."), ("version", "a/b"),
    ("as", "../escape"), ("as", MANIFEST), ("path", "../../outside"), ("path", "/etc/passwd"),
    ("path", "link-out"), ("path", "missing"),
])
def test_stage_refuses_unsafe_names_and_paths(client, transport, tmp_path, root, field, value):
    entry = _upload(transport, tmp_path, "weights.ebpk", b"w")
    outside = tmp_path / "outside"
    outside.write_bytes(b"w")
    (root / "incoming" / "link-out").symlink_to(outside)
    args = {"name": "rtn", "version": "v1", "files": [entry]}
    if field in ("name", "version"):
        args[field] = value
    else:
        entry[field] = value
    with pytest.raises(DeviceError, match="StageError"):
        client.call("stage", args)
    assert list((root / "stages").iterdir()) == []
    assert not (tmp_path / "escape").exists() and not (root / "evil").exists()


def test_stage_rejects_malformed_arguments(client):
    with pytest.raises(DeviceError, match="BadRequest: argument 'files' must be list"):
        client.call("stage", {"name": "a", "version": "b", "files": "weights.ebpk"})
    with pytest.raises(DeviceError, match="BadRequest: files\\[0\\].sha256 must be 64 hex digits"):
        client.call("stage", {"name": "a", "version": "b",
                              "files": [{"path": "x", "sha256": "abc", "as": "x"}]})


def test_deploy_stage_uploads_hashes_and_installs(client, transport, tmp_path, root):
    (tmp_path / "model.onnx").write_bytes(b"graph bytes")
    (tmp_path / "weights.ebpk").write_bytes(b"weight bytes")
    result = deploy_stage(client, transport, "seedlm", "abc123",
                          {"model.onnx": tmp_path / "model.onnx", "weights.ebpk": tmp_path / "weights.ebpk"})
    assert result["files"]["weights.ebpk"]["sha256"] == hashlib.sha256(b"weight bytes").hexdigest()
    assert (root / "stages" / "seedlm" / "abc123" / "model.onnx").read_bytes() == b"graph bytes"


# --- activate / rollback ----------------------------------------------------------------

def test_activate_and_rollback(client, transport, tmp_path, root):
    for version in ("v1", "v2"):
        _stage(client, transport, tmp_path, "rtn", version)
    assert client.activate("rtn", "v1")["previous"] is None
    assert (root / "current" / "weights.ebpk").read_bytes() == b"rtn/v1"
    assert client.activate("rtn", "v2")["previous"] == {"name": "rtn", "version": "v1"}
    assert client.activate("rtn", "v2")["changed"] is False
    assert json.loads((root / "active").read_text())["active"]["version"] == "v2"
    assert os.readlink(root / "current") == os.path.join("stages", "rtn", "v2")
    assert client.rollback() == {"active": {"name": "rtn", "version": "v1"},
                                 "rolled_back": {"name": "rtn", "version": "v2"}}
    assert (root / "current" / "weights.ebpk").read_bytes() == b"rtn/v1"
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "no temporary link is left"
    assert client.hello()["active"] == {"name": "rtn", "version": "v1"}
    with pytest.raises(DeviceError, match="NothingToRollback"):
        client.rollback()
    with pytest.raises(DeviceError, match="StageError: stage rtn/v9 is not installed"):
        client.activate("rtn", "v9")


# --- protocol robustness ----------------------------------------------------------------

def test_malformed_lines_get_error_replies_and_the_agent_keeps_serving(transport):
    stdin, stdout = transport.open()
    lines = [b"not json\n", b"[1, 2]\n", b'{"id": 1}\n', b'{"id": 2, "cmd": "info", "args": []}\n',
             b"\xff\xfe\n", b'{"id": 3, "cmd": "info", "extra": 1}\n', b"\n",
             protocol.request(4, "hello", {"protocol": 1}), protocol.request(5, "shutdown")]
    stdin.write(b"".join(lines))
    stdin.close()
    replies = [json.loads(line) for line in stdout.read().splitlines()]
    assert [(r["id"], r["ok"]) for r in replies] == [
        (None, False), (None, False), (1, False), (2, False), (None, False), (3, False),
        (4, True), (5, True)]
    assert {r["error"]["type"] for r in replies if not r["ok"]} == {"ProtocolError"}
    assert "not JSON" in replies[0]["error"]["message"]


def test_unknown_command_is_an_error_reply(client):
    with pytest.raises(DeviceError, match=r"UnknownCommand: unknown command 'frobnicate' \(known: hello"):
        client.call("frobnicate")
    assert client.hello()["protocol"] == protocol.PROTOCOL_VERSION


def test_time_and_score_need_a_loaded_model(client):
    with pytest.raises(DeviceError, match="NotLoaded"):
        client.time(prompt_len=8)
    with pytest.raises(DeviceError, match="NotLoaded"):
        client.score([([1], [2])])


def test_agent_that_dies_raises_device_error_with_its_stderr(tmp_path):
    code = "import sys; sys.stderr.write('fatal: cannot map weights\\n'); sys.exit(3)"
    with pytest.raises(DeviceError, match=r"exit status 3\); last stderr: fatal: cannot map weights"):
        AgentClient(_fake_agent(tmp_path, code), timeout_s=10).hello()


def test_killed_agent_raises_device_error(client, transport):
    client.hello()
    os.kill(transport.proc.pid, signal.SIGKILL)
    with pytest.raises(DeviceError, match="stopped before replying to 'info' \\(exit status -9\\)"):
        client.info()
    with pytest.raises(DeviceError, match="connection to the agent is closed"):
        client.info()


def test_unusable_root_is_reported_from_the_agent_stderr(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    transport = LocalTransport(tmp_path / "file" / "root")
    with pytest.raises(DeviceError, match="last stderr: edgebuild-agent: cannot use root"):
        AgentClient(transport, timeout_s=30).hello()


def test_silent_agent_times_out_and_is_stopped(tmp_path):
    transport = _fake_agent(tmp_path, "import time; time.sleep(60)", stop_timeout_s=0.2)
    client = AgentClient(transport, timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(DeviceError, match=r"no reply to 'hello' within 0.5 s; the agent was stopped"):
        client.hello()
    assert time.monotonic() - start < 10
    assert transport.exit_status() is not None


def test_garbage_reply_is_a_protocol_error_but_banners_are_skipped(tmp_path):
    reply = ("import json, sys\nreq = json.loads(sys.stdin.readline())\nprint('Welcome to the board')\n"
             "print(json.dumps({'id': req['id'], 'ok': True, 'result': {'protocol': 1}}), flush=True)\n"
             "req = json.loads(sys.stdin.readline())\nprint('{\"id\": 2, \"ok\": \"yes\"}', flush=True)\n"
             "sys.stdin.readline()\n")
    client = AgentClient(_fake_agent(tmp_path, reply, stop_timeout_s=1), timeout_s=10)
    assert client.hello()["protocol"] == 1
    with pytest.raises(DeviceError, match="protocol error in the reply to 'info'"):
        client.info()


def test_log_lines_never_reach_stdout(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edgebuild.device_agent", "serve", "--stdio", "--root", str(tmp_path),
         "--log-level", "DEBUG"],
        input=protocol.request(1, "nope") + protocol.request(2, "shutdown"), capture_output=True,
        timeout=60)
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in replies] == [1, 2] and proc.returncode == 0
    assert b"request 1 nope" in proc.stderr


def test_stray_output_of_libraries_goes_to_stderr():
    code = ("import os\nfrom edgebuild.device_agent.__main__ import _protocol_stdout\n"
            "out = _protocol_stdout()\nprint('stray print', flush=True)\nos.write(1, b'native write\\n')\n"
            "out.write(b'{\"id\": 1}\\n')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.stdout == b'{"id": 1}\n'
    assert b"stray print" in proc.stderr and b"native write" in proc.stderr


# --- the agent stays a small, torch-free, Python 3.9 distribution -----------------------

@pytest.mark.parametrize("module", ["__main__.py", "server.py", "protocol.py", "sysinfo.py",
                                    "runtime.py"])
def test_agent_modules_parse_as_python_39(module):
    ast.parse((AGENT_DIR / module).read_text(), feature_version=(3, 9))


def test_agent_core_imports_only_the_standard_library():
    code = ("import sys, edgebuild.device_agent.server, edgebuild.device_agent.__main__\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'onnxruntime')"
            " or m.startswith('edgebuild.build')]\nprint(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


# --- load / time / score on a tiny exported model ---------------------------------------

def export_tiny_stage(base: Path, vocab_size: int = 256):
    """A seeded 2-layer random Llama, exported to ONNX with its weights packed as fp32 ``raw``
    in ``base/tiny-<vocab_size>`` (once: the folder is reused when it is complete).

    Returns ``(model, {file name in the stage: path})``.
    """
    import numpy as np
    import torch
    import transformers

    from edgebuild.device_agent.packed import Record, write
    from edgebuild.export import exporters

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128,
                                      vocab_size=vocab_size, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    out = base / f"tiny-{vocab_size}"
    if not (out / "weights.ebpk").is_file():
        work = base / f".tiny-{vocab_size}-{os.getpid()}"
        exporters.get("onnx")().export(model, None, work)
        records = [Record(name, tuple(t.shape), "raw", {}, {"data": t.detach().numpy().astype(np.float32)})
                   for name, t in model.state_dict().items() if name != "lm_head.weight"]
        write(work / "weights.ebpk", records, {})
        os.rename(work, out)
    return model, {name: out / name for name in ("model.onnx", "graph.json", "weights.ebpk")}


@pytest.fixture(scope="module")
def tiny_stage(tmp_path_factory):
    """A 2-layer random Llama exported to ONNX, with its weights packed as fp32 ``raw``."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return export_tiny_stage(tmp_path_factory.getbasetemp())


def torch_scores(model, requests) -> list:
    """``[(logprob, is_greedy)]`` of ``[(context, continuation)]`` from the torch model."""
    import torch

    out = []
    with torch.no_grad():
        for context, continuation in requests:
            logits = model(torch.tensor([context + continuation])).logits[0].double()
            steps = torch.log_softmax(logits, -1)[len(context) - 1:-1]
            logprob = sum(steps[i, t].item() for i, t in enumerate(continuation))
            out.append((logprob, bool((steps.argmax(-1) == torch.tensor(continuation)).all())))
    return out


def test_load_time_and_score_a_staged_model(client, transport, tiny_stage):
    model, files = tiny_stage
    deploy_stage(client, transport, "raw", "v1", files)
    loaded = client.load("raw", "v1", threads=1)
    assert loaded["loaded"] == {"name": "raw", "version": "v1"} and loaded["threads"] == 1
    timing = client.time(prompt_len=8, decode_tokens=3, warmup=1, repeats=2)
    assert len(timing["prefill_ms"]) == 2 and len(timing["decode_ms_per_token"]) == 2
    assert all(ms > 0 for ms in timing["prefill_ms"]) and timing["peak_rss_mb"] > 0
    requests = [([1, 2, 3, 4], [5, 6]), ([7], [8, 9, 10])]
    for (logprob, greedy), (want, want_greedy) in zip(client.score(requests),
                                                      torch_scores(model, requests)):
        assert logprob == pytest.approx(want, abs=1e-3) and greedy == want_greedy


def test_score_shares_contexts_and_keeps_the_request_order(client, transport, tiny_stage):
    import numpy as np

    model, files = tiny_stage
    deploy_stage(client, transport, "raw", "v1", files)
    client.load("raw", "v1", threads=1)
    rng = np.random.default_rng(1)
    contexts = [rng.integers(0, 256, n).tolist() for n in (1, 9, 30)]
    requests = [(contexts[i % 3], rng.integers(0, 256, 1 + i % 5).tolist()) for i in range(15)]
    greedy = ([5, 6, 7], [int(t) for t in torch_greedy(model, [5, 6, 7], 3)])
    requests += [greedy, (greedy[0], greedy[1][:1])]
    want = torch_scores(model, requests)
    for budget in (None, 16):        # one batch per context, or one continuation per batch
        got = client.score(requests, max_batch_tokens=budget)
        assert [g for _, g in got] == [g for _, g in want] and got[-1][1] and got[-2][1]
        np.testing.assert_allclose([lp for lp, _ in got], [lp for lp, _ in want], atol=1e-4)


def torch_greedy(model, context, n) -> list:
    """Greedy continuation of ``context`` by the torch model, ``n`` tokens."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([context]), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(context):].tolist()


def test_score_reports_tokens_and_refuses_bad_ids(client, transport, tiny_stage):
    deploy_stage(client, transport, "raw", "v1", tiny_stage[1])
    client.load("raw", "v1", threads=1)
    reply = client.call("score", {"requests": [{"context": [1, 2], "continuation": [3]}]})
    assert reply["tokens"] == 3 and reply["score_s"] >= 0 and len(reply["results"]) == 1
    with pytest.raises(DeviceError, match="BadRequest: requests\\[0\\] holds token ids >= the vocabulary size 256"):
        client.score([([1], [256])])
    with pytest.raises(DeviceError, match="BadRequest: argument 'max_batch_tokens' must be >= 16"):
        client.score([([1], [2])], max_batch_tokens=4)


def test_load_without_a_name_loads_the_active_stage(client, transport, tiny_stage):
    deploy_stage(client, transport, "raw", "v1", tiny_stage[1])
    with pytest.raises(DeviceError, match="BadRequest: no stage is active"):
        client.load()
    client.activate("raw", "v1")
    assert client.load(threads=1)["loaded"] == {"name": "raw", "version": "v1"}


def test_context_batches_keep_equal_contexts_together():
    from edgebuild.targets.client import context_batches

    pairs = [([1], [2]), ([3], [4]), ([1], [5]), ([6], [7]), ([3], [8]), ([9], [1])]
    assert context_batches(pairs, 3) == [[0, 2], [1, 4, 3], [5]]
    assert context_batches(pairs, 100) == [[0, 2, 1, 4, 3, 5]]
    assert context_batches([([1], [2])] * 5, 2) == [[0, 1, 2, 3, 4]]


def test_load_and_time_refuse_bad_requests(client, transport, tmp_path, tiny_stage):
    _model, files = tiny_stage
    deploy_stage(client, transport, "raw", "v1", files)
    _stage(client, transport, tmp_path, "junk", "v1")
    with pytest.raises(DeviceError, match="StageError: stage raw/v1 has no other.pack"):
        client.load("raw", "v1", packed="other.pack")
    with pytest.raises(DeviceError, match="RuntimeLoadError: .*not an exported graph directory"):
        client.load("junk", "v1")
    client.load("raw", "v1", threads=1)
    with pytest.raises(DeviceError, match=r"BadRequest: unknown time argument\(s\) \['tokens'\]"):
        client.call("time", {"tokens": 3})
    with pytest.raises(DeviceError, match="BadRequest: requests\\[0\\].continuation must be a non-empty"):
        client.call("score", {"requests": [{"context": [1], "continuation": []}]})
