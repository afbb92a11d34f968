"""ONNX export with KV cache: a graph without weight data, a complete weight map, verification."""
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

from edgebuild.core.errors import ConfigError, ExitCode  # noqa: E402
from edgebuild.export import ExportError, exporters  # noqa: E402
from edgebuild.export.onnx_graph import (  # noqa: E402
    WEIGHTS_LOCATION, CachedCausalLM, OnnxExporter, weight_sources)


def tiny_llama(tie=True, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
                                      tie_word_embeddings=tie, initializer_range=0.2)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_llama()
    out = tmp_path_factory.mktemp("onnx")
    graph = OnnxExporter().export(model, None, out)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model, out, graph, state


PROMPTS = [[5, 6, 7, 8], [1], list(range(100, 140))]


def test_registry_gives_the_onnx_exporter_lazily():
    assert exporters.get("onnx") is OnnxExporter
    with pytest.raises(ConfigError, match="did you mean 'onnx'"):
        exporters.get("onx")


def test_importing_the_package_loads_neither_torch_nor_onnx():
    code = ("import sys, edgebuild.export; "
            "sys.exit(1 if {'torch', 'onnx', 'onnxruntime'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_model_file_holds_no_weight_data(exported):
    model, out, graph, _ = exported
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert (out / "model.onnx").stat().st_size < param_bytes
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    by_name = {t.name: t for t in proto.graph.initializer}
    for name in graph["weights"]:
        tensor = by_name[name]
        assert tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data
        assert dict((e.key, e.value) for e in tensor.external_data)["location"] == WEIGHTS_LOCATION
    assert not (out / WEIGHTS_LOCATION).exists()
    inline = sum(len(t.raw_data) for t in proto.graph.initializer if t.name not in graph["weights"])
    assert inline < 1024  # only small graph constants (e.g. rotary frequencies) stay inline


def test_graph_json_maps_every_weight(exported):
    model, out, graph, state = exported
    assert json.loads((out / "graph.json").read_text()) == graph
    assert graph["format"] == 1
    geometry = (graph["num_layers"], graph["num_kv_heads"], graph["head_dim"], graph["vocab_size"])
    assert geometry == (2, 2, 16, 1000)
    assert graph["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert graph["inputs"][3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert graph["outputs"][0] == "logits" and graph["outputs"][-1] == "present.1.value"
    sources = {spec["source"] for spec in graph["weights"].values()}
    assert sources == set(state) - {"lm_head.weight"}  # tied: the head reads the embedding
    for spec in graph["weights"].values():
        shape = list(state[spec["source"]].shape)
        assert spec["shape"] == (shape[::-1] if spec["transpose"] else shape) and spec["dtype"] == "float32"
    transposed = {spec["source"] for spec in graph["weights"].values() if spec["transpose"]}
    assert "model.layers.0.self_attn.q_proj.weight" in transposed  # nn.Linear weights: MatMul layout
    assert "model.layers.0.input_layernorm.weight" not in transposed


def test_no_weight_is_transposed_at_run_time(exported):
    _, out, graph, _ = exported
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    transposes = [n for n in proto.graph.node if n.op_type == "Transpose" and n.input[0] in graph["weights"]]
    assert transposes == []


def test_untied_head_keeps_its_own_source():
    model = tiny_llama(tie=False)
    sources = weight_sources(CachedCausalLM(model), model)
    assert sources["lm.lm_head.weight"] == "lm_head.weight"
    assert sources["lm.model.embed_tokens.weight"] == "model.embed_tokens.weight"
    assert sorted(sources.values()) == sorted(model.state_dict())


def test_verify_accepts_the_models_own_weights(exported):
    model, out, _, state = exported
    result = OnnxExporter().verify(out, state, model, None, prompts=PROMPTS)
    assert result["max_abs_diff"] <= result["tolerance"] == 2e-3
    assert result["greedy_match"] is True
    assert result["prompts"] == 3


def test_verify_rejects_a_perturbed_weight(exported):
    model, out, _, state = exported
    bad = dict(state)
    name = "model.layers.1.mlp.down_proj.weight"
    bad[name] = state[name] + np.float32(0.05)
    with pytest.raises(ExportError, match="differ from torch") as info:
        OnnxExporter().verify(out, bad, model, None, prompts=PROMPTS[:1])
    assert info.value.exit_code == ExitCode.MODEL


def test_verify_rejects_missing_weights(exported):
    model, out, _, state = exported
    partial = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(ExportError, match="model.norm.weight"):
        OnnxExporter().verify(out, partial, model, None, prompts=PROMPTS[:1])


def test_verify_needs_prompts_it_can_tokenize(exported):
    model, out, _, state = exported
    with pytest.raises(ExportError, match="tokenizer"):
        OnnxExporter().verify(out, state, model, None)
    with pytest.raises(ExportError, match="at least one prompt"):
        OnnxExporter().verify(out, state, model, None, prompts=[])


def test_export_refuses_half_precision(tmp_path):
    with pytest.raises(ExportError, match="float32"):
        OnnxExporter().export(tiny_llama().half(), None, tmp_path)
    assert not (tmp_path / "model.onnx").exists()


def test_exporter_refuses_bad_settings():
    with pytest.raises(ConfigError, match="opset 17"):
        OnnxExporter(opset=17)
    with pytest.raises(ConfigError, match="decode_steps"):
        OnnxExporter(decode_steps=0)
