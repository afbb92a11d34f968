"""The build deploys what it compresses: every stage encoded into a runtime directory, the host
judging the deployed weights, the ladder choosing by runtime bytes, and the device step measuring
each stage alone and comparing the runtime weights' sha256 with the host's."""
import hashlib

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai")

from conftest import DATA_DIR  # noqa: E402
from edgebuild.bench.stats import FAIL, PASS  # noqa: E402
from edgebuild.build import gates, ladder  # noqa: E402
from edgebuild.build.config import load_config  # noqa: E402
from edgebuild.build.pipeline import BuildRequest, Pipeline  # noqa: E402
from edgebuild.core.steps import StageRun  # noqa: E402

STEPS = ("pack", "runtime", "quality", "device")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """baseline and an rtn stage of tiny-random, encoded, judged on the host and measured by the
    local target's agent (no device benchmarks: those are the golden builds')."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"benchmark data not found at {DATA_DIR}")
    cfg = load_config(None, stages=["baseline", "rtn"], tasks=["arc_easy"], device_tasks=[])
    out = tmp_path_factory.mktemp("build")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEBUILD_HOME", str(out / "home"))              # the local agent's own root
        pipe = Pipeline(BuildRequest("tiny-random", "local", cfg, out, data_dir=DATA_DIR, steps=STEPS))
        result = pipe.run()
    return pipe, {r.stage: r for r in result.runs}


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_stage_is_encoded_with_the_targets_plan_and_the_baseline_in_fp32(built):
    from edgebuild.device_agent import runtime_dir
    _, runs = built
    assert runs["baseline"].pack["runtime"]["encodings"] == {"linear": "fp32", "embedding": "fp32"}
    assert runs["rtn"].pack["runtime"]["encodings"] == {"linear": "int4", "embedding": "int4"}
    for run in runs.values():
        rt = run.pack["runtime"]
        folder = rt["path"]
        manifest = runtime_dir.read_manifest(folder)
        assert rt["bytes"] == sum(f["bytes"] for f in manifest["files"].values())
        assert rt["transport_bytes"] == run.pack["bytes"]
        assert rt["weights_sha256"] == _sha256(runtime_dir.Path(folder) / runtime_dir.WEIGHTS)
        assert rt["verify"]["max_abs_diff"] <= rt["verify"]["tolerances"]["max_abs_diff"]
    assert runs["rtn"].pack["runtime"]["weights_bytes"] < runs["baseline"].pack["runtime"]["weights_bytes"] / 4


def test_transcoding_is_deterministic(built, tmp_path):
    from edgebuild.export.encodings import RuntimePlan
    from edgebuild.export.runtime_build import encode_stage
    pipe, runs = built
    run = runs["rtn"]
    model, tok = pipe.ctx.models.base()
    again = encode_stage(model, tok, tmp_path / "again", RuntimePlan.from_dict(run.pack["runtime"]),
                         records=pipe.ctx.models.records(run))
    assert again["weights_sha256"] == run.pack["runtime"]["weights_sha256"]
    import importlib.metadata
    import onnx
    graph = onnx.load(str(tmp_path / "again" / "model.onnx"), load_external_data=False)
    assert graph.producer_version == importlib.metadata.version("onnxruntime-genai")   # no commit stamp


def test_the_host_judges_the_deployed_weights(built):
    from edgebuild.export.deployed import deployed_state_dict
    pipe, runs = built
    run = runs["rtn"]
    judged = pipe.ctx.models.for_stage(run)[0].state_dict()
    compressed = pipe.ctx.models.compressed(run)[0].state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    deployed = deployed_state_dict(run.pack["runtime"]["path"])
    np.testing.assert_array_equal(judged[name].numpy(), deployed[name])
    assert not np.array_equal(compressed[name].numpy(), deployed[name])   # transcoding changed it
    assert run.quality["deployment"]["kl"] > 0
    assert runs["baseline"].quality["deployment"]["kl"] < 1e-4             # fp32: the same model


def test_the_device_measures_each_stage_alone_and_checks_the_weights_hash(built):
    _, runs = built
    for run in runs.values():
        dev = run.device
        assert dev["status"] == "ok" and dev["format"] == "runtime"
        assert dev["weights"] == {"host": run.pack["runtime"]["weights_sha256"],
                                  "device": run.pack["runtime"]["weights_sha256"], "match": True}
        assert dev["stored_bytes"] >= run.pack["runtime"]["bytes"]
        assert dev["stage_rss_mb"] > 0 and dev["peak_rss_mb"] >= dev["rss_mb"] > dev["rss_before_load_mb"]
        assert len(dev["decode_ms_per_token"]) == len(dev["prefill_ms"]) > 0
    assert runs["baseline"].device["pid"] != runs["rtn"].device["pid"]       # a fresh process each


def test_a_weights_hash_that_differs_on_the_device_fails_the_stage():
    ok = {"status": "ok", "weights": {"host": "a" * 64, "device": "a" * 64, "match": True}}
    bad = {"status": "ok", "weights": {"host": "a" * 64, "device": "b" * 64, "match": False}}
    assert [c.verdict for c in gates.weights_checks(ok)] == [PASS]
    assert [c.verdict for c in gates.weights_checks(bad)] == [FAIL]
    assert gates.weights_checks({"status": "unreachable"}) == []
    cfg = load_config(None).gates
    ev = gates.StageEvidence("rtn", {}, {}, {}, device=bad)
    report = gates.evaluate(ev, cfg)
    assert not report.passed and any(r.startswith("device/weights_sha256") for r in report.reasons)


def _run(stage, packed, runtime=None):
    run = StageRun(stage, "m", {}, 0, None, pack={"bytes": packed})
    if runtime is not None:
        run.pack["runtime"] = {"bytes": runtime}
    return run


def test_the_ladder_ships_the_smallest_stage_by_runtime_bytes():
    # vptq packs smaller than seedlm, but both deploy to the same int4 runtime: no shrink, seedlm ships
    passed = {"baseline": _run("baseline", 100, 100), "seedlm": _run("seedlm", 30, 20),
              "vptq": _run("vptq", 20, 20)}
    assert ladder.choose(["baseline", "seedlm", "vptq"], passed, 0.05) == "seedlm"
    assert ladder.deployed_bytes(passed["vptq"]) == 20
    assert ladder.deployed_bytes(_run("x", 20)) == 20                        # no runtime: packed bytes


def test_the_device_agreement_compares_host_and_device_log_likelihoods():
    from types import SimpleNamespace

    from edgebuild.bench.devicelm import agreement
    from edgebuild.targets.step import _compared
    run = StageRun("rtn", "rtn", {}, 0, None)
    run.host = {"piqa": {"items": [[3, 1.0], [5, 0.0]],
                         "responses": {"3": [[-1.0, True], [-2.0, False]], "5": [[-3.0, False], [-2.5, False]]}}}
    dev = SimpleNamespace(responses={"piqa": {3: [[-1.2, True], [-2.0, False]], 5: [[-2.0, False], [-2.6, False]]}})
    scores = {"piqa": {"items": [[3, 1.0], [5, 1.0]]}}
    got = agreement(*_compared(run, dev, scores, ["piqa"], {"piqa": {3, 5}}))
    assert got["max_loglik_diff"] == pytest.approx(1.0) and got["same_prediction"] == 0.5
    del run.host["piqa"]["responses"]                                        # a host record without them
    assert agreement(*_compared(run, dev, scores, ["piqa"], {"piqa": {3, 5}}))["max_loglik_diff"] is None


def test_the_build_asks_the_device_which_encodings_it_runs(built):
    from edgebuild.export.encodings import plan_from_spec
    pipe, runs = built
    assert pipe.ctx.runtime_plan == {"plan": plan_from_spec(pipe.ctx.target.runtime), "notes": []}
    assert runs["rtn"].pack["runtime"]["fallback"] == []


def test_a_device_lacking_an_operator_falls_back_only_when_the_spec_says_so():
    from types import SimpleNamespace

    from edgebuild.build.pipeline import device_runtime_plan
    from edgebuild.core.errors import TargetError
    from edgebuild.targets.spec import RuntimeSpec
    old = {"onnxruntime": "1.21.0", "kernels": None}          # GatherBlockQuantized with zero points: 1.23
    with pytest.raises(TargetError, match="GatherBlockQuantized"):
        device_runtime_plan(SimpleNamespace(runtime=RuntimeSpec(encoding="int4")), old)
    chosen = device_runtime_plan(SimpleNamespace(runtime=RuntimeSpec(encoding="int4", fallback_encoding="fp32")), old)
    assert (chosen["plan"].linear, chosen["plan"].embedding) == ("int4", "fp32")
    assert chosen["notes"][0].startswith("embedding: int4 -> fp32")
    assert device_runtime_plan(SimpleNamespace(runtime=RuntimeSpec()), None) is None
