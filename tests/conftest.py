"""Shared test settings: where the benchmark data and the bundled tokenizer live."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("EDGEBUILD_DATA_DIR", REPO.parent / "shared" / "data"))
TOKENIZER_DIR = REPO / "core" / "assets" / "smollm2-tokenizer"


def tiny_llama(tokenizer_dir=TOKENIZER_DIR):
    """A seeded 2-layer random LLaMA with the real SmolLM2 tokenizer: ``(model, tokenizer)``."""
    import pytest

    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 tokenizer files not found")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128,
                         vocab_size=len(tokenizer), tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval(), tokenizer


def lm_eval_tasks(names, tmp_path, profile="smoke", num_fewshot=None):
    """The lm-eval task objects edgebuild generates for benchmarks ``names`` (data from DATA_DIR):
    ``{task name: task}``, task names in order."""
    from lm_eval.tasks import TaskManager

    from edgebuild.bench import benchmarks
    from edgebuild.bench.profiles import get_profile
    from edgebuild.bench.runner import prepare

    task_names = []
    for name in names:
        prepared = prepare(benchmarks.get(name), DATA_DIR, tmp_path / "cache", tmp_path,
                           get_profile(profile), 0, num_fewshot=num_fewshot)
        task_names += [part.task_name for part in prepared.parts]
    loaded = TaskManager(include_path=str(tmp_path), include_defaults=False).load(task_names)["tasks"]
    return {name: loaded[name] for name in task_names}
