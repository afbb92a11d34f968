"""A stage that chains onto an earlier one compresses only what that stage left in floating point."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgebuild.compress import apply_records, pack_leftovers, pack_model
from edgebuild.compress.base import CompressContext


def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_leftovers_keep_compressed_records_and_compress_raw_matrices():
    model = tiny()
    first = pack_model(model, "rtn", {"bits": 4, "group_size": 32}, CompressContext())
    second = pack_leftovers(first, "rtn", {"bits": 8, "group_size": 32}, CompressContext())
    before = {r.name: r for r in first}
    after = {r.name: r for r in second}
    assert list(after) == list(before)
    assert after["model.embed_tokens.weight"].codec == "rtn"
    assert after["model.embed_tokens.weight"].params["bits"] == 8
    assert after["model.norm.weight"].codec == "raw"                       # 1-D: left alone
    for name, rec in before.items():
        if rec.codec == "rtn":
            assert after[name] is rec                                       # not compressed twice
    apply_records(model, second)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
