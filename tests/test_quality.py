"""Quality metrics: reference log-probabilities and their comparison with a stage."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgebuild.bench.quality import compare, quality_texts, reference_logprobs
from edgebuild.core.errors import DataError

from conftest import DATA_DIR  # noqa: E402
TEXTS = [
    "The committee met on Tuesday to discuss the budget for the new library, and after a long "
    "debate the members agreed to postpone the vote until the next meeting.",
    "She opened the window, listened to the rain for a while, and then went back to her book.",
    "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on "
    "high mountains.",
]


def _tokenizer_dir() -> Path | None:
    import edgebuild.core

    candidates = [Path(edgebuild.core.__file__).parent / "assets" / "smollm2-tokenizer"]
    return next((p for p in candidates if (p / "tokenizer.json").is_file()), None)


def _tiny(tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128,
                         vocab_size=len(tokenizer), tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_model():
    """A seeded 2-layer random LLaMA with the real SmolLM2 tokenizer."""
    directory = _tokenizer_dir()
    if directory is None:
        pytest.skip("SmolLM2 tokenizer files not found")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    return _tiny(tokenizer, 0), tokenizer


@pytest.fixture(scope="module")
def reference(tiny_model):
    model, tokenizer = tiny_model
    return reference_logprobs(model, tokenizer, TEXTS, max_tokens=16)


def test_reference_shape_and_dtype(tiny_model, reference):
    _, tokenizer = tiny_model
    positions = sum(min(16, len(tokenizer(t)["input_ids"])) for t in TEXTS)
    assert reference.dtype == np.float16
    assert reference.shape == (positions, len(tokenizer))
    probs = np.exp(reference.astype(np.float64)).sum(axis=-1)
    assert np.allclose(probs, 1.0, atol=0.05)


def test_model_against_itself(tiny_model, reference):
    model, tokenizer = tiny_model
    result = compare(model, tokenizer, TEXTS, reference, max_tokens=16)
    assert set(result) == {"kl", "top1_agreement", "ppl_ratio"}
    assert abs(result["kl"]) < 1e-3
    assert result["top1_agreement"] == 1.0
    assert result["ppl_ratio"] == pytest.approx(1.0, abs=1e-2)


def test_perturbed_model_differs(tiny_model, reference):
    import torch

    model, tokenizer = tiny_model
    other = _tiny(tokenizer, 0)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn_like(param) * 0.5 * param.std())
    result = compare(other, tokenizer, TEXTS, reference, max_tokens=16)
    assert result["kl"] > 1e-3
    assert result["top1_agreement"] < 1.0
    assert result["ppl_ratio"] != pytest.approx(1.0, abs=1e-4)


def test_mismatched_reference_raises(tiny_model, reference):
    model, tokenizer = tiny_model
    with pytest.raises(DataError, match="rebuild the baseline reference"):
        compare(model, tokenizer, TEXTS[:2], reference, max_tokens=16)


@pytest.mark.skipif(not DATA_DIR.is_dir(),
                    reason=f"benchmark data dir {DATA_DIR} not found (set EDGEBUILD_DATA_DIR)")
def test_quality_texts_are_a_fixed_seeded_sample():
    texts = quality_texts(DATA_DIR, n=8, seed=0)
    assert len(texts) == 8 and texts == quality_texts(DATA_DIR, n=8, seed=0)
    assert texts != quality_texts(DATA_DIR, n=8, seed=1)
    from edgebuild.bench.tasks import lambada

    first = [doc["text"] for doc in lambada.convert(DATA_DIR).eval_docs[:8]]
    assert texts != first and len(set(texts)) == 8


def test_quality_texts_missing_data(tmp_path):
    with pytest.raises(DataError):
        quality_texts(tmp_path)
