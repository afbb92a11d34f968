"""``vptq``: index packing, vector quantisation, calibration, records and the numpy decoder."""

import numpy as np
import pytest
import torch

from edgebuild.core.errors import ConfigError, ModelError
from edgebuild.compress import CompressContext, methods, pack_model, packed_stats
from edgebuild.compress._vptq_calib import calibration_batches, collect_hessians, token_stream
from edgebuild.compress._vptq_core import quantize_group
from edgebuild.compress.vptq import VPTQ, VPTQConfig, table_record, tensor_record
from edgebuild.device_agent import packed
from edgebuild.device_agent.codecs import TABLE, decode, decode_all, tables_of
from edgebuild.device_agent.codecs.vptq import (
    VPTQFormatError, pack_indices, packed_nbytes, unpack_indices,
)

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SMALL = {"vector_len": 2, "codebook_bits": 5, "residual_codebook_bits": 3, "kmeans_iters": 8,
         "calibration_samples": 8, "calibration_seq_len": 32}


def _cfg(**knobs):
    return VPTQConfig(**{**SMALL, **knobs})


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=96,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _texts(count=6, length=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (length,), generator=g).tolist() for _ in range(count)]


def _group_tables(books):
    tables = {"codebook": table_record("book", books.main)}
    if books.outlier is not None:
        tables["outlier_codebook"] = table_record("outliers", books.outlier)
    if books.residual is not None:
        tables["residual_codebook"] = table_record("residual", books.residual)
    return tables


def _correlated_hessian(cols, seed=0, tokens=400):
    """``2 XᵀX / n`` of inputs with very unequal, correlated channels (like LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * torch.logspace(-1, 1, cols)[:, None]
    x = torch.randn(tokens, cols, generator=g) @ mix
    return 2 * x.T @ x / tokens


@pytest.fixture(scope="module")
def tiny():
    return _tiny_llama()


@pytest.fixture(scope="module")
def compressed(tiny):
    ctx = CompressContext(model=tiny, calibration_texts=_texts(), seed=3)
    records = pack_model(tiny, "vptq", dict(SMALL, outlier_fraction=0.05), ctx)
    return records, ctx.log["vptq"]


# --- index packing --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 3, 8, 12, 13, 16, 24])
def test_index_packing_is_exact_and_tight(bits):
    rng = np.random.default_rng(bits)
    for count in (0, 1, 7, 8, 9, 1001):
        indices = rng.integers(0, 1 << bits, count)
        stream = pack_indices(indices, bits)
        assert stream.dtype == np.uint8 and stream.size == packed_nbytes(count, bits)
        np.testing.assert_array_equal(unpack_indices(stream, bits, count), indices)
        stream_bits = np.unpackbits(stream, bitorder="little")[:count * bits].reshape(count, bits)
        np.testing.assert_array_equal(stream_bits.astype(np.int64) @ (1 << np.arange(bits)), indices)


def test_index_unpacking_refuses_wrong_length():
    with pytest.raises(VPTQFormatError, match="expected 3"):
        unpack_indices(np.zeros(4, dtype=np.uint8), 12, 2)


# --- vector quantisation --------------------------------------------------------------------------

def _relative_error(weight, cfg, hessian=None):
    cols = weight.shape[1]
    hessian = torch.eye(cols) if hessian is None else hessian
    results, _, _ = quantize_group([weight], [hessian], cfg, _gen())
    return float(((results[0].reconstruction - weight) ** 2).sum() / (weight ** 2).sum())


def test_error_falls_as_the_codebook_grows():
    weight = torch.randn(32, 48, generator=_gen(5))
    errors = [_relative_error(weight, _cfg(codebook_bits=b, residual_codebook_bits=0))
              for b in (1, 3, 5, 7)]
    assert all(a > 1.5 * b for a, b in zip(errors, errors[1:])), errors
    with_residual = _relative_error(weight, _cfg(codebook_bits=5, residual_codebook_bits=4))
    assert with_residual < 0.6 * errors[2]


def test_codebook_as_large_as_the_distinct_vectors_is_exact_up_to_fp16():
    column = torch.randn(16, 1, generator=_gen(2))
    weight = column.repeat(1, 24) * 0.3 + 0.01          # 8 distinct vectors of 2 rows
    results, books, _ = quantize_group([weight], [torch.eye(24)], _cfg(codebook_bits=3,
                                       residual_codebook_bits=0), _gen())
    err = (results[0].reconstruction - weight).abs().max()
    assert float(err) <= 2e-3 * float(weight.abs().max())
    assert books.main.shape == (8, 2)


def test_hessian_weighting_beats_plain_vector_quantisation():
    weight = torch.randn(32, 64, generator=_gen(7)) * 0.05
    hessian = _correlated_hessian(64)
    cfg = _cfg(codebook_bits=4, residual_codebook_bits=0)

    def output_error(h):
        results, _, _ = quantize_group([weight], [h], cfg, _gen())
        e = results[0].reconstruction - weight
        return float(((e @ hessian) * e).sum())

    assert output_error(hessian) < 0.7 * output_error(torch.eye(64))


def test_hessian_weighting_beats_plain_vq_on_model_activations(tiny):
    names = ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    hessians = collect_hessians(tiny, names, calibration_batches(_texts(), None, 8, 32), "cpu")
    cfg = _cfg(codebook_bits=4, residual_codebook_bits=0)
    for name in names:
        weight = tiny.get_submodule(name).weight.detach().clone()
        h = hessians[name]
        plain, _, _ = quantize_group([weight], [torch.eye(h.shape[0])], cfg, _gen())
        vptq, _, _ = quantize_group([weight], [h], cfg, _gen())
        errors = [float((((r[0].reconstruction - weight) @ h) * (r[0].reconstruction - weight)).sum())
                  for r in (plain, vptq)]
        assert errors[1] < 0.9 * errors[0], (name, errors)


@pytest.mark.parametrize("knobs", [
    {}, {"residual_codebook_bits": 0}, {"outlier_fraction": 0.1},
    {"outlier_fraction": 0.1, "outlier_storage": "codebook"},
    {"vector_len": 4, "codebook_bits": 7, "residual_codebook_bits": 5, "outlier_fraction": 0.3},
])
def test_numpy_decoder_equals_torch_reconstruction_exactly(knobs):
    cfg = _cfg(**knobs)
    weights = [torch.randn(16, 40, generator=_gen(i)) * (i + 1) for i in range(3)]
    weights[1][:, 5] = 0.0                                  # a constant column
    hessians = [_correlated_hessian(40, seed=i) for i in range(3)]
    hessians[2][7, :] = hessians[2][:, 7] = 0               # a dead input channel
    results, books, layers = quantize_group(weights, hessians, cfg, _gen())
    tables = _group_tables(books)
    for i, (result, layer) in enumerate(zip(results, layers)):
        record = tensor_record(f"w{i}", (16, 40), result, layer, cfg, tables)
        out = decode(record, tables_of(tables.values()))
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, result.reconstruction.numpy())
        with_book = cfg.outlier_fraction and cfg.outlier_storage == "codebook"
        assert record.params["outlier_codebook"] == ("outliers" if with_book else None)


def _spiky_weight():
    weight = torch.randn(16, 40, generator=_gen(1))
    weight[:, 11] *= 30
    weight[:, 29] *= 20
    return weight


def test_outlier_columns_are_the_heaviest_and_kept_in_fp16():
    weight = _spiky_weight()
    cfg = _cfg(outlier_fraction=0.05, residual_codebook_bits=0)
    results, books, layers = quantize_group([weight], [torch.eye(40)], cfg, _gen())
    assert sorted(layers[0].perm[:2].tolist()) == [11, 29] and books.outlier is None
    record = tensor_record("w", (16, 40), results[0], layers[0], cfg, _group_tables(books))
    assert record.arrays["outlier_columns"].tolist() == [11, 29]
    assert record.arrays["outlier_values"].dtype == np.float16
    assert record.arrays["indices"].size == packed_nbytes(38 * 8, 5)     # no indices for them
    out = decode(record, tables_of(_group_tables(books).values()))
    np.testing.assert_array_equal(out[:, [11, 29]], weight[:, [11, 29]].half().float().numpy())


def test_outlier_columns_can_have_their_own_codebook():
    cfg = _cfg(outlier_fraction=0.05, outlier_storage="codebook")
    results, books, layers = quantize_group([_spiky_weight()], [torch.eye(40)], cfg, _gen())
    assert books.outlier is not None and books.outlier.shape == books.main.shape
    record = tensor_record("w", (16, 40), results[0], layers[0], cfg, _group_tables(books))
    assert "outlier_values" not in record.arrays
    assert record.arrays["indices"].size == packed_nbytes(40 * 8, 5)


# --- calibration ----------------------------------------------------------------------------------

def test_token_stream_and_batches():
    assert token_stream([[1, 2], [3]], None) == [1, 2, 3]
    batches = calibration_batches([list(range(100))], None, samples=3, seq_len=30)
    assert [tuple(b.shape) for b in batches] == [(3, 30)]
    short = calibration_batches([list(range(10))], None, samples=3, seq_len=30)
    assert [tuple(b.shape) for b in short] == [(1, 10)]
    with pytest.raises(ConfigError, match="tokenizer"):
        token_stream(["some text"], None)
    with pytest.raises(ConfigError, match="no tokens"):
        calibration_batches([[]], None, 4, 8)


def test_hessians_are_collected_once_per_distinct_input(tiny):
    names = [f"model.layers.0.{p}" for p in LINEARS]
    batch = torch.tensor(_texts(1, 40)[0])[None]
    hessians = collect_hessians(tiny, names, [batch], "cpu")
    assert hessians[names[0]] is hessians[names[1]] is hessians[names[2]]
    assert hessians[names[4]] is hessians[names[5]]
    seen = {}
    hook = tiny.get_submodule(names[6]).register_forward_pre_hook(
        lambda m, args: seen.setdefault("x", args[0].reshape(-1, args[0].shape[-1]).clone()))
    with torch.no_grad():
        tiny(batch)
    hook.remove()
    x = seen["x"]
    torch.testing.assert_close(hessians[names[6]], 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)


# --- the method -----------------------------------------------------------------------------------

def test_compress_decodes_close_to_the_original(tiny, compressed):
    records, facts = compressed
    decoded = decode_all(records)
    for name in (f"model.layers.{i}.{p}.weight" for i in range(2) for p in LINEARS):
        w = tiny.state_dict()[name].numpy()
        assert decoded[name].shape == w.shape
        assert ((decoded[name] - w) ** 2).sum() < 0.1 * (w ** 2).sum(), name
    assert facts["tensors"] == 14 and 0 < facts["proxy_error_mean"] < 0.1


def test_shared_codebooks_are_stored_once(compressed, tiny):
    records, facts = compressed
    tables = [r for r in records if r.codec == TABLE]
    assert len(tables) == len(LINEARS) * 2 == facts["tables"]   # codebook, residual
    assert records[:len(tables)] == tables
    for proj in LINEARS:
        recs = [r for r in records if r.name.endswith(f"{proj}.weight") and r.codec == "vptq"]
        assert len(recs) == 2 and recs[0].params == recs[1].params
        assert recs[0].params["codebook"] == f"model.layers.*.{proj}.weight.vptq.codebook"
    alone = VPTQ(_cfg(share_codebooks=False)).compress(
        {n: w for n, w in tiny.state_dict().items() if n.endswith("q_proj.weight")},
        CompressContext(model=tiny, calibration_texts=_texts()))
    assert sum(r.codec == TABLE for r in alone) == 4


def test_bits_per_weight_counts_codebooks(compressed):
    records, facts = compressed
    bpw = facts["bits_per_weight"]
    weights = facts["weights"]
    tensors = [r for r in records if r.codec == "vptq"]
    coded = [(r.shape[1] - r.arrays["outlier_columns"].size) * r.shape[0] // 2 for r in tensors]
    table_bytes = sum(r.nbytes for r in records if r.codec == TABLE)
    assert bpw["codebooks"] == pytest.approx(8 * table_bytes / weights) and table_bytes > 0
    assert bpw["indices"] == pytest.approx(sum(8 * packed_nbytes(c, 5) for c in coded) / weights)
    assert bpw["residual_indices"] == pytest.approx(sum(8 * packed_nbytes(c, 3) for c in coded) / weights)
    fp16 = sum(r.arrays["outlier_values"].size for r in tensors)
    assert bpw["outliers"] >= 16 * fp16 / weights > 0
    assert bpw["total"] == pytest.approx(packed_stats(records)["bits_per_weight"], rel=1e-6)
    vptq_bytes = sum(r.nbytes for r in tensors)
    assert bpw["total"] == pytest.approx(8 * (vptq_bytes + table_bytes) / weights, rel=1e-6)


def test_records_survive_the_packed_file(compressed, tmp_path):
    records, _ = compressed
    path = tmp_path / "w.ebpack"
    packed.write(path, records)
    _, back = packed.read(path)
    for name, array in decode_all(back).items():
        np.testing.assert_array_equal(array, decode_all(records)[name])


def test_compress_reports_progress_and_is_seeded(tiny):
    weights = {n: w for n, w in tiny.state_dict().items() if "layers.0.self_attn" in n}
    calls = []
    ctx = CompressContext(model=tiny, calibration_texts=_texts(), progress=lambda d, t: calls.append((d, t)))
    first = VPTQ(_cfg()).compress(weights, ctx)
    again = VPTQ(_cfg()).compress(weights, CompressContext(model=tiny, calibration_texts=_texts()))
    assert calls[-1] == (4, 4) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    for a, b in zip(first, again):
        assert a.name == b.name and all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)


def test_compress_accepts_text_with_a_tokenizer(tiny):
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    import edgebuild.core

    asset = Path(edgebuild.core.__file__).parent / "assets" / "smollm2-tokenizer" / "tokenizer.json"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(asset))
    ids = token_stream(["Hello world.", "Again."], tok)
    assert len(ids) > 3
    small = _tiny_llama()
    small.resize_token_embeddings(len(tok))
    weights = {"model.layers.0.self_attn.v_proj.weight": small.state_dict()["model.layers.0.self_attn.v_proj.weight"]}
    ctx = CompressContext(model=small, tokenizer=tok, calibration_texts=["The cat sat on the mat."] * 4)
    records = VPTQ(_cfg()).compress(weights, ctx)
    assert records[-1].codec == "vptq" and ctx.log["vptq"]["calibration_tokens"] > 20


def test_compress_needs_calibration_texts_and_fitting_tensors(tiny):
    w = {"model.layers.0.self_attn.q_proj.weight": tiny.state_dict()["model.layers.0.self_attn.q_proj.weight"]}
    with pytest.raises(ConfigError, match="calibration"):
        VPTQ(_cfg()).compress(w, CompressContext(model=tiny))
    with pytest.raises(ConfigError, match="vector_len"):
        VPTQ(_cfg(vector_len=3)).compress(w, CompressContext(model=tiny, calibration_texts=_texts()))
    with pytest.raises(ModelError, match="2-D"):
        VPTQ(_cfg()).compress({"x": torch.zeros(4)}, CompressContext(model=tiny, calibration_texts=_texts()))


@pytest.mark.parametrize("knob,value", [
    ("vector_len", 0), ("vector_len", 2.0), ("codebook_bits", 0), ("codebook_bits", 17),
    ("residual_codebook_bits", -1), ("outlier_fraction", 0.9), ("outlier_fraction", True),
    ("kmeans_iters", 0), ("calibration_samples", 0), ("calibration_seq_len", "long"),
    ("damp", 0.0), ("share_codebooks", "yes"), ("outlier_storage", "disk"),
])
def test_bad_knobs_raise_config_error(knob, value):
    with pytest.raises(ConfigError, match=knob):
        VPTQConfig(**{knob: value})


def test_registered_and_decoder_refuses_a_missing_table(compressed):
    assert methods.get("vptq") is VPTQ
    records, _ = compressed
    tensor = next(r for r in records if r.codec == "vptq")
    with pytest.raises(VPTQFormatError, match="missing"):
        decode(tensor, {})


def test_knob_walk_adds_outliers_samples_then_codebook_bits():
    from edgebuild.compress.search import knob_walk

    walk = knob_walk({"outlier_fraction": 0.0, "calibration_samples": 32, "codebook_bits": 8,
                      "residual_codebook_bits": 0}, VPTQ.knob_space, VPTQ.knob_order)
    assert walk[0]["outlier_fraction"] == 0.01 and walk[2]["outlier_fraction"] == 0.03
    assert [w["calibration_samples"] for w in walk[3:5]] == [64, 128]
    assert [w["codebook_bits"] for w in walk[5:7]] == [10, 12] and walk[-1]["residual_codebook_bits"] == 8
    assert all(VPTQ.from_knobs(k) for k in walk)
