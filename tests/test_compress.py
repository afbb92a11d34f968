"""The reference method ``rtn`` and whole-model packing on a tiny random LLaMA."""
import dataclasses

import numpy as np
import pytest
import torch

from edgebuild.core.errors import ConfigError, ModelError
from edgebuild.compress import (
    CompressContext, apply_records, method_info, methods, pack_model, packed_stats,
    select_linear_weights,
)
from edgebuild.compress.rtn import RTN, RTNConfig
from edgebuild.device_agent import packed
from edgebuild.device_agent.codecs import decode, decode_all
from edgebuild.device_agent.codecs.rtn import pack_bits, packed_nbytes, unpack_bits
from edgebuild.device_agent.packed import Record

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _weight(rows=16, cols=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3] = 0.0                     # an all-zero row
    w[4, :32] = 0.123              # a constant group
    w[5] *= 40                     # a row of large values
    return w


def _rtn(**knobs):
    return RTN(RTNConfig(**knobs))


def _group_scales(record, cols):
    group = record.params["group_size"]
    return np.repeat(record.arrays["scales"].astype(np.float32), group, axis=1)[:, :cols]


# --- rtn ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [8, 32, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_is_at_most_half_a_scale(bits, group_size, symmetric):
    w = _weight()
    rec = _rtn(bits=bits, group_size=group_size, symmetric=symmetric).compress_one("w", w)
    out = decode(rec)
    assert out.dtype == np.float32 and out.shape == (16, 72)
    err = np.abs(out - w.numpy())
    bound = _group_scales(rec, 72) / 2
    assert np.all(err <= bound * (1 + 1e-5) + 1e-9), float((err - bound).max())
    assert np.all(out[3] == 0.0)


def test_rtn_constant_group_is_exact_when_fp16_holds_it():
    w = torch.full((2, 64), 0.125)
    for symmetric in (False, True):
        rec = _rtn(bits=2, group_size=32, symmetric=symmetric).compress_one("w", w)
        np.testing.assert_array_equal(decode(rec), w.numpy())


def test_rtn_error_shrinks_with_bits():
    w = _weight(64, 256)
    errors = [np.abs(decode(_rtn(bits=b, group_size=64).compress_one("w", w)) - w.numpy()).mean()
              for b in range(2, 9)]
    assert all(a > 1.5 * b for a, b in zip(errors, errors[1:]))


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_is_exact_and_tight(bits):
    rng = np.random.default_rng(bits)
    for count in (0, 1, 7, 8, 9, 1001):
        codes = rng.integers(0, 1 << bits, count).astype(np.uint8)
        stream = pack_bits(codes, bits)
        assert stream.dtype == np.uint8 and stream.size == (count * bits + 7) // 8
        np.testing.assert_array_equal(unpack_bits(stream, bits, count), codes)
        stream_bits = np.unpackbits(stream, bitorder="little")[:count * bits].reshape(count, bits)
        np.testing.assert_array_equal(stream_bits @ (1 << np.arange(bits)), codes)


def test_unpack_refuses_wrong_length():
    with pytest.raises(ValueError, match="expected 2"):
        unpack_bits(np.zeros(3, dtype=np.uint8), 3, 5)


@pytest.mark.parametrize("bits,group,symmetric,expected", [
    (4, 128, False, 4 + 32 / 128), (4, 128, True, 4 + 16 / 128), (3, 64, False, 3 + 32 / 64),
    (2, 64, False, 2 + 32 / 64), (8, -1, False, 8 + 32 / 256), (5, 8, True, 5 + 16 / 8),
])
def test_rtn_bits_per_weight(bits, group, symmetric, expected):
    rec = _rtn(bits=bits, group_size=group, symmetric=symmetric).compress_one("w", _weight(64, 256))
    assert rec.arrays["codes"].nbytes == packed_nbytes(64 * 256, bits)
    assert rec.arrays["scales"].dtype == np.float16
    assert ("zeros" in rec.arrays) == (not symmetric)
    assert 8 * rec.nbytes / rec.numel == pytest.approx(expected)


def test_rtn_partial_last_group_is_stored_per_row():
    rec = _rtn(bits=3, group_size=32).compress_one("w", _weight(16, 72))
    assert rec.arrays["scales"].shape == (16, 3)
    assert rec.arrays["codes"].nbytes == packed_nbytes(16 * 72, 3)


def test_rtn_compress_keeps_names_and_reports_progress():
    seen = []
    ctx = CompressContext(progress=lambda done, total: seen.append((done, total)))
    weights = {"b": _weight(8, 16), "a": _weight(6, 32)}
    records = _rtn(group_size=16).compress(weights, ctx)
    assert [r.name for r in records] == ["b", "a"]
    assert all(r.codec == "rtn" and r.params["group_size"] == 16 for r in records)
    assert seen == [(1, 2), (2, 2)]


def test_rtn_refuses_bad_tensors():
    with pytest.raises(ModelError, match="2-D"):
        _rtn().compress_one("v", torch.zeros(8))
    w = _weight()
    w[0, 0] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        _rtn().compress_one("w", w)


def test_knob_walk_moves_each_knob_in_order_towards_quality():
    from edgebuild.compress.rtn import RTN
    from edgebuild.compress.search import knob_walk

    walk = knob_walk({"bits": 4, "group_size": 128, "symmetric": False}, RTN.knob_space, RTN.knob_order)
    assert [(k["group_size"], k["bits"]) for k in walk] == [(64, 4), (32, 4), (32, 5), (32, 6), (32, 8)]
    assert knob_walk({"bits": 8, "group_size": 32}, RTN.knob_space, RTN.knob_order) == []
    assert knob_walk({"group_size": -1}, {"group_size": [128, 64]}, ("group_size",)) == \
        [{"group_size": 128}, {"group_size": 64}]             # a value not listed: every listed one
    pair = knob_walk({"block_size": 12, "latent_dim": 4}, {"block_size,latent_dim": [[12, 4], [8, 3]]},
                     ("block_size,latent_dim",))
    assert pair == [{"block_size": 8, "latent_dim": 3}]


@pytest.mark.parametrize("space, order, match", [
    ({}, (), "knob space of 'rtn' is empty"),
    ({"bits": []}, ("bits",), "non-empty list"),
    ({"bitz": [4]}, ("bitz",), "no knob 'bitz'"),
    ({"bits": [4]}, ("group_size",), "order names 'group_size'"),
    ({"bits": [4, 99]}, ("bits",), "refuses the setting"),
])
def test_bad_knob_spaces_are_one_line_config_errors(space, order, match):
    from edgebuild.compress.rtn import RTN
    from edgebuild.compress.search import check_space
    from edgebuild.core.errors import ConfigError

    with pytest.raises(ConfigError, match=match) as err:
        check_space(RTN, space, order, "b.toml: stage.x")
    assert "\n" not in str(err.value) and str(err.value).startswith("b.toml: stage.x")


def test_every_method_declares_a_valid_knob_space():
    from edgebuild.compress import methods
    from edgebuild.compress.search import check_space

    for name in methods.names():
        cls = methods.get(name)
        check_space(cls, cls.knob_space, cls.knob_order, name)


@pytest.mark.parametrize("knob,value", [
    ("bits", 1), ("bits", 9), ("bits", 4.0), ("bits", True), ("group_size", 0), ("group_size", 4),
    ("group_size", 48), ("group_size", -2), ("symmetric", "yes"),
])
def test_bad_knobs_raise_config_error(knob, value):
    with pytest.raises(ConfigError, match=rf"'{knob}'.*allowed"):
        RTN.from_knobs({knob: value})


def test_rtn_is_registered_as_reference():
    assert methods.get("rtn") is RTN
    info = {m["name"]: m for m in method_info()}
    assert set(info) == {"rtn", "seedlm", "vptq", "hyper"}
    assert info["rtn"]["available"] and info["rtn"]["reference"]
    assert info["rtn"]["knobs"] == {"bits": 4, "group_size": 128, "symmetric": False}
    for entry in info.values():
        assert entry["available"] or entry["reason"]


# --- whole model ----------------------------------------------------------------------------------

def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=96,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny():
    return _tiny_llama()


@pytest.fixture(scope="module")
def tiny_records(tiny):
    return pack_model(tiny, "rtn", {"bits": 3, "group_size": 32}, CompressContext())


def test_select_linear_weights(tiny):
    names = select_linear_weights(tiny)
    assert names == [f"model.layers.{i}.{p}.weight" for i in range(2) for p in LINEARS]
    with_embed = select_linear_weights(tiny, include_embeddings=True)
    assert with_embed == ["model.embed_tokens.weight"] + names


def test_pack_model_records(tiny, tiny_records):
    state_names = [n for n in tiny.state_dict() if n != "lm_head.weight"]
    assert [r.name for r in tiny_records] == state_names
    selected = set(select_linear_weights(tiny))
    for rec in tiny_records:
        assert rec.codec == ("rtn" if rec.name in selected else "raw")
        assert rec.shape == tuple(tiny.state_dict()[rec.name].shape)
        if rec.codec == "raw":
            assert rec.params == {"dtype": "float16"} and rec.arrays["data"].dtype == np.float16
        else:
            assert rec.params == {"bits": 3, "group_size": 32, "symmetric": False}


def test_pack_model_stores_untied_head(tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**tiny.config.to_dict(), "tie_word_embeddings": False})
    model = LlamaForCausalLM(config)
    names = [r.name for r in pack_model(model, "rtn", {}, CompressContext())]
    assert "lm_head.weight" in names and "lm_head.weight" not in select_linear_weights(model)


def test_pack_model_progress_and_raw_dtypes(tiny):
    seen = []
    ctx = CompressContext(progress=lambda done, total: seen.append((done, total)))
    records = pack_model(tiny, "rtn", {}, ctx, include_embeddings=True, raw_dtype="bfloat16")
    total = len(records)
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert records[0].name == "model.embed_tokens.weight" and records[0].codec == "rtn"
    norm = next(r for r in records if r.codec == "raw")
    assert norm.params == {"dtype": "bfloat16"} and norm.arrays["data"].dtype == np.uint16
    want = tiny.state_dict()[norm.name].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(decode(norm), want)
    raw32 = pack_model(tiny, "rtn", {}, CompressContext(), raw_dtype="float32")
    norm32 = next(r for r in raw32 if r.codec == "raw")
    np.testing.assert_array_equal(decode(norm32), tiny.state_dict()[norm32.name].numpy())


@pytest.mark.parametrize("method,knobs,pattern", [
    ("rtm", {}, "did you mean 'rtn'"), ("rtn", {"bitz": 4}, "bitz"),
    ("rtn", {"bits": 12}, "'bits'"),
])
def test_pack_model_bad_method_or_knobs(tiny, method, knobs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        pack_model(tiny, method, knobs, CompressContext())
    with pytest.raises(ConfigError, match="raw_dtype"):
        pack_model(tiny, "rtn", {}, CompressContext(), raw_dtype="int8")


def test_apply_records_reproduces_decoded_weights(tiny_records, tmp_path):
    packed.write(tmp_path / "w.ebpack", tiny_records)
    _, records = packed.read(tmp_path / "w.ebpack")
    model = _tiny_llama(seed=1)
    apply_records(model, records)
    state, want = model.state_dict(), decode_all(records)
    for name, array in want.items():
        np.testing.assert_array_equal(state[name].numpy(), array)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    np.testing.assert_array_equal(state["lm_head.weight"].numpy(), want["model.embed_tokens.weight"])
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_apply_records_error_follows_bits(tiny, tiny_records):
    ids = torch.tensor([[5, 17, 3, 60, 2]])
    fine = pack_model(tiny, "rtn", {"bits": 8, "group_size": 32}, CompressContext())
    errors = []
    for records in (fine, tiny_records):
        model = _tiny_llama(seed=1)
        apply_records(model, records)
        with torch.no_grad():
            errors.append(float((tiny(ids).logits - model(ids).logits).abs().max()))
    assert errors[0] < 0.01 < errors[1] < 1.0


def _renamed(records, old, new):
    return [dataclasses.replace(r, name=new) if r.name == old else r for r in records]


def test_apply_records_refuses_mismatches(tiny_records):
    model = _tiny_llama(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extra = tiny_records + [Record("model.ghost", (2,), "raw", {"dtype": "float16"},
                                   {"data": np.zeros(2, dtype=np.float16)})]
    with pytest.raises(ModelError, match="model.ghost"):
        apply_records(model, extra)
    with pytest.raises(ModelError, match="no record for model tensor 'model.norm.weight'"):
        apply_records(model, [r for r in tiny_records if r.name != "model.norm.weight"])
    bad = [dataclasses.replace(r, shape=(1, 64), arrays={"data": r.arrays["data"][None]})
           if r.name == "model.norm.weight" else r for r in tiny_records]
    with pytest.raises(ModelError, match="shape"):
        apply_records(model, bad)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_packed_stats(tiny, tiny_records):
    stats = packed_stats(tiny_records)
    linear = sum(tiny.state_dict()[n].numel() for n in select_linear_weights(tiny))
    total = sum(v.numel() for k, v in tiny.state_dict().items() if k != "lm_head.weight")
    rtn_bytes = sum(r.nbytes for r in tiny_records if r.codec == "rtn")
    raw_bytes = sum(r.nbytes for r in tiny_records if r.codec == "raw")
    assert stats["compressed_weights"] == linear and stats["total_weights"] == total
    assert stats["bytes_payload"] == rtn_bytes + raw_bytes == 2 * (total - linear) + rtn_bytes
    assert stats["bits_per_weight"] == pytest.approx(3 + 32 / 32)
    assert stats["bits_per_weight_all"] == pytest.approx(8 * (rtn_bytes + raw_bytes) / total)
    assert stats["by_codec"]["rtn"] == {"tensors": 14, "bytes": rtn_bytes, "weights": linear}
    assert stats["by_codec"]["raw"]["weights"] == total - linear


def test_packed_stats_counts_tables_as_compressed_bytes():
    records = [
        Record("book", (0,), "table", {}, {"c": np.zeros(10, dtype=np.float32)}),
        Record("w", (4, 8), "vptq", {"table": "book"}, {"i": np.zeros(8, dtype=np.uint8)}),
        Record("n", (8,), "raw", {"dtype": "float16"}, {"data": np.zeros(8, dtype=np.float16)}),
    ]
    stats = packed_stats(records)
    assert stats["compressed_weights"] == 32 and stats["total_weights"] == 40
    assert stats["bits_per_weight"] == pytest.approx(8 * 48 / 32)
    assert stats["bits_per_weight_all"] == pytest.approx(8 * 64 / 40)
    assert stats["by_codec"]["table"] == {"tensors": 1, "bytes": 40, "weights": 0}


@pytest.mark.parametrize("method", ["rtn", "seedlm", "vptq", "hyper"])
def test_compression_is_the_same_whatever_the_torch_threads(method):
    """A build's next trials compress in other processes (Ray tasks, one thread each): the
    records must be those the build's own process makes."""
    from conftest import tiny_llama
    model, tok = tiny_llama()
    before, packs = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ctx = CompressContext(model=model, tokenizer=tok, calibration_texts=["a short calibration text"] * 4)
            packs.append(pack_model(model, method, {}, ctx))
    finally:
        torch.set_num_threads(before)
    one, two = packs
    assert [r.name for r in one] == [r.name for r in two]
    for a, b in zip(one, two):
        assert a.params == b.params and all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
