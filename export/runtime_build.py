"""Encode a stage into a runtime directory: the stage's own weights, in the plan's runtime encodings.

    meta = encode_stage(model, tokenizer, "out/rt/int4", RuntimePlan("int4", "int4"), records=records)

The stage's weights (its packed records decoded with the device codecs, or a decoded state dict)
are put into a copy of ``model``; onnxruntime-genai's builder lays out the float graph from them
(``runtime_graph``); each tensor class is then rewritten into its encoding (``blockwise``). A
method whose own format cannot run natively (SeedLM seeds, VPTQ codebooks, Hyper-Compression's
θ) is thereby transcoded, deterministically, from the weights the stage actually has: never
requantised from the baseline. The result is written whole or not at all (built beside
``out_dir`` and renamed into place) and described by ``runtime.json`` (``runtime_dir``).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edgebuild.core.files import write_json_atomic
from edgebuild.device_agent import runtime_dir
from edgebuild.export import onnx_edit, runtime_graph
from edgebuild.export.base import ExportError
from edgebuild.export.encodings import RuntimePlan
from edgebuild.export.operators import plan_requirements

log = logging.getLogger(__name__)



def stage_state(model, records=None, state=None) -> dict:
    """The stage's float32 weights by state-dict name: ``records`` decoded with the device codecs,
    or ``state``, over ``model``'s own (a tied output head follows the embedding)."""
    from edgebuild.device_agent.codecs import decode_all

    if (records is None) == (state is None):
        raise ExportError("give the stage's weights as exactly one of records and state")
    given = decode_all(records) if records is not None else {k: np.asarray(v) for k, v in state.items()}
    own = model.state_dict()
    unknown = sorted(set(given) - set(own))
    if unknown:
        raise ExportError(f"the stage holds tensor {unknown[0]!r}, which the model does not have; "
                          f"were its weights made for another model?")
    return given


def stage_model(model, weights: dict):
    """A float32 copy of ``model`` carrying ``weights`` (re-tied when the model ties its head)."""
    import torch

    clone = copy.deepcopy(model).float().eval()
    targets = clone.state_dict()
    with torch.no_grad():
        for name, value in weights.items():
            if tuple(targets[name].shape) != tuple(value.shape):
                raise ExportError(f"stage tensor {name!r} has shape {tuple(value.shape)}, the model "
                                  f"expects {tuple(targets[name].shape)}")
            targets[name].copy_(torch.as_tensor(np.array(value, dtype=np.float32)))
    if hasattr(clone, "tie_weights"):
        clone.tie_weights()
    return clone


def apply_plan(model, plan: RuntimePlan) -> None:
    """Rewrite the float builder graph ``model`` (an ``onnx.ModelProto``) into ``plan``'s encodings."""
    gather, head = runtime_graph.head_and_embedding(model)
    plan.encoding("linear").linear(model, runtime_graph.linear_nodes(model))
    plan.encoding("embedding").embedding(model, gather, head)
    onnx_edit.drop_unused(model)


def _save_graph(model, folder: Path) -> None:
    import importlib.metadata

    import onnx

    # the builder stamps its version with the git commit of the working directory: the same stage
    # must give the same bytes wherever it is encoded
    model.producer_version = importlib.metadata.version("onnxruntime-genai")

    for name in (runtime_dir.GRAPH, runtime_dir.WEIGHTS):
        (folder / name).unlink(missing_ok=True)
    onnx.save_model(model, str(folder / runtime_dir.GRAPH), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=runtime_dir.WEIGHTS, size_threshold=1024)


def _genai_config(folder: Path) -> dict:
    path = folder / runtime_dir.GENAI_CONFIG
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"] = {"log_id": "edgebuild", "provider_options": []}
    path.write_text(json.dumps(config, indent=1))
    return config


def _manifest(folder: Path, plan: RuntimePlan, tensors: dict, stage_config, extra: dict) -> dict:
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    files = runtime_dir.describe_files(folder, names)
    genai = json.loads((folder / runtime_dir.GENAI_CONFIG).read_text())
    eos = genai["model"].get("eos_token_id")
    return {
        "format": runtime_dir.FORMAT, "version": runtime_dir.VERSION, **plan.to_dict(),
        "label": plan.label(), "weights_file": runtime_dir.WEIGHTS,
        "weights_sha256": files[runtime_dir.WEIGHTS]["sha256"],
        "runtime_bytes": sum(f["bytes"] for f in files.values()),
        "weights_bytes": files[runtime_dir.WEIGHTS]["bytes"], "files": files,
        "requirements": plan_requirements(plan), "tensors": tensors,
        "model": {"vocab_size": int(stage_config.vocab_size), "num_layers": int(stage_config.num_hidden_layers),
                  "model_type": stage_config.model_type,
                  "eos_token_ids": [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]},
        "generation": genai.get("search", {}), "created_at": time.time(), **extra,
    }


def encode_stage(model, tokenizer, out_dir, plan: RuntimePlan | None = None, *, records=None,
                 state=None, meta: dict | None = None) -> dict:
    """Encode a stage into the runtime directory ``out_dir``; return its ``runtime.json`` content.

    ``model`` is the float32 torch model of the build (its architecture and, for tensors the stage
    does not hold, its weights); ``records`` (packed records) or ``state`` (decoded state dict) are
    the stage's weights; ``plan`` picks each tensor class's encoding (default: int4, block 32,
    asymmetric, accuracy level 4). ``meta`` is copied into ``runtime.json`` (e.g. the stage name).
    """
    import onnx

    plan = (plan or RuntimePlan()).validate()
    weights = stage_state(model, records=records, state=state)
    stage = stage_model(model, weights)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}-", dir=out_dir.parent) as tmp:
        tmp = Path(tmp)
        _save_quietly(stage, tokenizer, tmp / "hf")
        build = runtime_graph.build_float_graph(tmp / "hf", tmp / "runtime", tmp / "cache")
        graph = onnx.load(str(build / runtime_dir.GRAPH), load_external_data=True)
        full = {k: v.detach().numpy() for k, v in stage.state_dict().items()}
        tensors = runtime_graph.tensor_map(graph, stage.config, full)
        apply_plan(graph, plan)
        _save_graph(graph, build)
        _genai_config(build)
        manifest = _manifest(build, plan, tensors, stage.config,
                             {"meta": meta or {}, "encode_s": round(time.perf_counter() - start, 2)})
        write_json_atomic(build / runtime_dir.MANIFEST, manifest)
        _install(build, out_dir)
    log.info("encoded %s: %.1f MB in %.1f s", plan.label(), manifest["runtime_bytes"] / 1e6,
             manifest["encode_s"])
    return manifest


def _save_quietly(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` of both, without transformers' own progress bar (the build shows its own)."""
    from transformers.utils import logging as hf_logging
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _install(build: Path, out_dir: Path) -> None:
    """Move the finished ``build`` folder to ``out_dir``, replacing an older one only when done."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(build, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
