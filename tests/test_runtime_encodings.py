"""Runtime encodings: a stage packed on the host, run in onnxruntime, against torch with the deployed weights."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime_genai")

from edgebuild.core import models  # noqa: E402
from edgebuild.core.errors import ConfigError, TargetError  # noqa: E402
from edgebuild.device_agent import runtime_dir  # noqa: E402
from edgebuild.device_agent.genai_runtime import GenaiRuntime  # noqa: E402
from edgebuild.device_agent.packed import Record  # noqa: E402
from edgebuild.device_agent.runtime import RuntimeLoadError  # noqa: E402
from edgebuild.export import operators  # noqa: E402
from edgebuild.export.deployed import deployed_model, deployed_state_dict, dequantize_blockwise  # noqa: E402
from edgebuild.export.encodings import Knobs, RuntimePlan, encodings  # noqa: E402
from edgebuild.export.runtime_build import encode_stage, stage_model  # noqa: E402
from edgebuild.bench.quality import deployment_kl, runtime_kl  # noqa: E402
from edgebuild.export.runtime_verify import verify_runtime  # noqa: E402
from edgebuild.targets.spec import RuntimeSpec  # noqa: E402

PLANS = {"fp32": RuntimePlan("fp32", "fp32"), "int8": RuntimePlan("int8", "int8"),
         "int4": RuntimePlan("int4", "int4")}
TEXTS = ["The quick brown fox jumps over the lazy dog and runs into the forest.",
         "In the beginning the universe was created, which made a lot of people angry."]


@pytest.fixture(scope="module")
def tiny():
    return models.load(models.resolve("tiny-random"))


def _state(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def encoded(tiny, tmp_path_factory):
    model, tok = tiny
    root = tmp_path_factory.mktemp("runtimes")
    return {name: (root / name, encode_stage(model, tok, root / name, plan, state=_state(model)))
            for name, plan in PLANS.items()}


def _block_error_bound(weight: np.ndarray, bits: int, block: int) -> np.ndarray:
    """One quantisation step of each weight's block (its range with 0, over 2**bits - 1 levels):
    round to nearest is within half a step, plus up to half a step for the integer zero point."""
    rows, cols = weight.shape
    padded = np.zeros((rows, -(-cols // block) * block), np.float32)
    padded[:, :cols] = weight
    blocks = padded.reshape(rows, -1, block)
    step = (np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)) / (2 ** bits - 1)
    return np.repeat(step, block, axis=1)[:, :cols] + 1e-6


@pytest.mark.parametrize("name", list(PLANS))
def test_each_encoding_round_trips_through_onnxruntime(tiny, encoded, name):
    model, tok = tiny
    folder, manifest = encoded[name]
    assert manifest["encodings"] == {"linear": name, "embedding": name}
    deployed = deployed_state_dict(folder)
    assert set(deployed) == set(model.state_dict())
    for key, original in _state(model).items():
        if name == "fp32" or original.ndim == 1:
            np.testing.assert_array_equal(deployed[key], original)
        else:   # round to nearest: within a step of each block's range
            bits = 8 if name == "int8" else 4
            assert (np.abs(deployed[key] - original) <= _block_error_bound(original, bits, 32)).all(), key
            assert not np.array_equal(deployed[key], original)
    result = verify_runtime(folder, deployed_model(model, folder), tok, threads=1)
    assert result["weights"]["max_abs_diff"] <= result["weights"]["tolerance"]
    assert result["top1_agreement"] >= result["tolerances"]["top1_agreement"]
    assert result["max_abs_diff"] <= result["tolerances"]["max_abs_diff"]
    if name == "fp32":
        assert result["greedy_match"] and result["max_abs_diff"] < 1e-3


def test_sizes_hashes_and_the_tied_head_stored_once(encoded):
    sizes = {name: manifest["runtime_bytes"] for name, (_, manifest) in encoded.items()}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"] / 2
    folder, manifest = encoded["int4"]
    assert manifest["weights_sha256"] == runtime_dir.sha256_file(folder / runtime_dir.WEIGHTS)
    import onnx
    graph = onnx.load(str(folder / runtime_dir.GRAPH), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "MatMul" not in ops
    big = [t for t in graph.graph.initializer if t.dims and t.dims[0] == 49152]
    assert len([t for t in big if t.name.endswith("_Q4")]) == 1      # embedding and head: one packed tensor
    assert not [t.name for t in big if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and t.dims[1] == 64]
    gather = next(n for n in graph.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    assert gather.input[2:] == head.input[2:]                     # same scales and zero points


def test_dequantiser_matches_onnxruntimes_quantiser_layout():
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)
    weight = np.random.default_rng(0).normal(size=(80, 24)).astype(np.float32)    # [K, N], K padded
    for bits, symmetric in ((4, False), (4, True), (8, False)):
        config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric, bits=bits)
        packed, scales, zeros = DefaultWeightOnlyQuantizer(config).qbits_block_quant(weight)
        out = dequantize_blockwise(packed, scales, None if symmetric else zeros, rows=24, cols=80,
                                   bits=bits, block_size=32)
        assert np.abs(out - weight.T).max() <= np.abs(scales).max() * 0.51


def test_a_mixed_plan_encodes_each_tensor_class_its_own_way(tiny, tmp_path):
    model, tok = tiny
    plan = RuntimePlan("int4", "fp32")
    manifest = encode_stage(model, tok, tmp_path / "mixed", plan, state=_state(model))
    assert manifest["label"] == "int4-g32-sym/emb=fp32"
    ops = {r["op"] for r in manifest["requirements"]}
    assert "MatMulNBits" in ops and "GatherBlockQuantized" not in ops
    deployed = deployed_state_dict(tmp_path / "mixed")
    np.testing.assert_array_equal(deployed["model.embed_tokens.weight"], _state(model)["model.embed_tokens.weight"])


def test_stage_weights_are_transcoded_not_the_baseline(tiny, tmp_path):
    model, tok = tiny
    state = _state(model)
    changed = {name: (value * 1.5 if value.ndim == 2 else value) for name, value in state.items()}
    records = [Record(n, v.shape, "raw", {"dtype": "float32"}, {"data": v.astype(np.float32)})
               for n, v in changed.items() if n != "lm_head.weight"]
    encode_stage(model, tok, tmp_path / "stage", RuntimePlan("int8", "int8"), records=records)
    deployed = deployed_state_dict(tmp_path / "stage")
    name = "model.layers.0.mlp.down_proj.weight"
    assert np.abs(deployed[name] - changed[name]).max() < np.abs(deployed[name] - state[name]).max() / 10
    as_deployed = deployed_model(model, tmp_path / "stage")
    as_compressed = deployment_kl(stage_model(model, changed), as_deployed, tok, TEXTS)
    against_baseline = deployment_kl(model, as_deployed, tok, TEXTS)
    assert as_compressed["kl"] < 1e-3 and as_compressed["kl"] < against_baseline["kl"] / 100


def test_kl_of_a_deployed_stage_against_the_stage_as_compressed(tiny, encoded):
    model, tok = tiny
    fp32 = runtime_kl(model, encoded["fp32"][0], tok, TEXTS, threads=1)
    int4 = runtime_kl(model, encoded["int4"][0], tok, TEXTS, threads=1)
    assert fp32["kl"] < 1e-4 and fp32["top1_agreement"] == 1.0   # float16 reference rounding
    assert int4["kl"] > fp32["kl"] and int4["kl"] < 0.05


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove"])
def test_a_corrupt_or_truncated_runtime_file_is_refused_naming_it(encoded, tmp_path, damage):
    folder = tmp_path / "copy"
    shutil.copytree(encoded["int4"][0], folder)
    weights = folder / runtime_dir.WEIGHTS
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (folder / runtime_dir.GRAPH).unlink()
    with pytest.raises(RuntimeLoadError) as err:
        GenaiRuntime.load(folder)
    message = str(err.value)
    assert "\n" not in message
    named = runtime_dir.GRAPH if damage == "remove" else runtime_dir.WEIGHTS
    assert str(folder / named) in message
    assert {"truncate": "truncated", "flip": "corrupt", "remove": "missing"}[damage] in message


def test_a_runtime_json_of_another_format_version_is_refused(encoded, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(encoded["int4"][0], folder)
    manifest = json.loads((folder / "runtime.json").read_text())
    (folder / "runtime.json").write_text(json.dumps(dict(manifest, version=99)))
    with pytest.raises(RuntimeLoadError, match=r"runtime.json: runtime format version 99 is not supported"):
        GenaiRuntime.load(folder)


def test_missing_operator_names_it_and_the_onnxruntime_it_needs():
    plan = RuntimePlan("int4", "int4", Knobs(symmetric=False))      # zero points: uint8 data needs 1.23
    with pytest.raises(TargetError) as err:
        operators.check_plan(plan, ort_version="1.22.1")
    message = err.value.one_line()
    assert "com.microsoft.GatherBlockQuantized" in message and ">= 1.23" in message
    assert "onnxruntime 1.22.1" in message and "\n" not in message
    operators.check_plan(plan, ort_version="1.23.0")
    operators.check_plan(RuntimePlan("int4", "int4"), ort_version="1.22.1")     # symmetric
    with pytest.raises(TargetError, match=">= 1.22"):
        operators.check_plan(RuntimePlan("int4", "int4"), ort_version="1.21.1")
    kernels = [{"domain": "com.microsoft", "op": op, "types": {"T1": ["tensor(float)"], "T2": ["tensor(uint8)"],
                                                                 "T": ["tensor(float)"]}}
               for op in ("MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization")]
    kernels.append({"domain": "", "op": "SimplifiedLayerNormalization", "types": {"T": ["tensor(float)"]}})
    with pytest.raises(TargetError, match=r"GatherBlockQuantized .*no CPU kernel registered"):
        operators.check_plan(plan, ort_version="1.32.0", kernels=kernels)
    operators.check_plan(RuntimePlan("int4", "fp32"), ort_version="1.32.0", kernels=kernels)


def test_fallback_happens_only_when_the_spec_names_one():
    spec = RuntimeSpec(encoding="int4", fallback_encoding="fp32")
    plan, notes = operators.plan_for_device(spec, ort_version="1.21.0")
    assert (plan.linear, plan.embedding) == ("int4", "fp32")
    assert len(notes) == 1 and notes[0].startswith("embedding: int4 -> fp32")
    plan, notes = operators.plan_for_device(spec, ort_version="1.32.0")
    assert (plan.linear, plan.embedding, notes) == ("int4", "int4", [])
    with pytest.raises(TargetError, match="GatherBlockQuantized"):
        operators.plan_for_device(RuntimeSpec(encoding="int4"), ort_version="1.21.0")
    with pytest.raises(TargetError, match="GroupQueryAttention"):      # the fallback cannot run either
        operators.plan_for_device(spec, ort_version="1.16.0")


def test_the_agent_refuses_a_runtime_its_onnxruntime_cannot_run(encoded, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(encoded["int4"][0], folder)
    manifest = json.loads((folder / "runtime.json").read_text())
    manifest["requirements"][0]["min_onnxruntime"] = "99.0"
    (folder / "runtime.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeLoadError, match=r"cannot run operator com.microsoft.GroupQueryAttention .* "
                                               r"it needs onnxruntime >= 99.0"):
        GenaiRuntime.load(folder)


def test_plans_and_spec_keys_are_validated():
    with pytest.raises(ConfigError, match="unknown runtime encoding 'int3'"):
        RuntimePlan("int3", "int4").validate()
    with pytest.raises(ConfigError, match="block_size 48 is not supported"):
        Knobs(block_size=48).validate()
    assert encodings.names() == ["fp32", "int4", "int8"]
    from edgebuild.targets.spec import parse_target
    text = ("name = 'x'\ndescription = 'x'\narch = 'native'\ncores = 1\nram_mb = 1\n"
            "storage_mb = 1\nmemory_bandwidth_gbps = 1.0\n[budgets]\ndecode_ms_per_token_p95 = 1.0\n"
            "prefill_ms = 1.0\npeak_rss_mb = 1.0\nartifact_mb = 1.0\n[runtime]\nencoding = 'int5'\n")
    with pytest.raises(TargetError, match=r"key 'runtime.encoding' must name an encoding \(fp32, int4, int8\), got 'int5'"):
        parse_target(text)
