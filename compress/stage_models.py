"""Torch models for a build's steps: the base model, loaded once, and each stage's model carrying
the weights its packed records decode to (``compressed``) or, once the stage has a runtime
directory, the weights the device executes (``for_stage``: ``export.deployed.deployed_model``)."""
from __future__ import annotations

import copy

from edgebuild.core import models


class StageModels:
    """``base()`` loads the model on first use, on ``device``; ``compressed(run)`` is the base model
    with the stage's decoded weights, ``for_stage(run)`` the model the stage is judged as (its
    deployed weights when it has a runtime directory), both kept per stage run; ``source(run)`` the
    compressed model, which the next stage of the ladder compresses."""

    def __init__(self, ref, progress, device: str = "cpu", deploy=None):
        self.ref, self.progress, self.device = ref, progress, device
        self.deploy = deploy        # (torch model, runtime dir) -> the model carrying its deployed weights
        self._base = None
        self._stages: dict = {}

    def base(self):
        """``(model, tokenizer)`` of the uncompressed model."""
        if self._base is None:
            with self.progress.step(f"load model {self.ref.spec}"):
                model, tok = models.load(self.ref)
                self._base = (model.to(str(self.device)), tok)
        return self._base

    def on_cpu(self, model):
        """``model`` itself when torch runs on the CPU, else a CPU copy (exporters trace on the CPU)."""
        return model if str(self.device) == "cpu" else copy.deepcopy(model).to("cpu")

    def source(self, run):
        """A private copy of ``run``'s model (the base model when ``run`` is None or the baseline)."""
        model, tok = self.base()
        if run is None or run.stage == "baseline":
            return copy.deepcopy(model), tok
        return self.compressed(run)

    def for_stage(self, run):
        """The torch model the host judges ``run`` as: the weights its runtime directory makes the
        device execute when it has one (``run.pack["runtime"]``), else its decoded weights."""
        runtime = (run.pack or {}).get("runtime")
        if not runtime or self.deploy is None:
            return self.compressed(run)
        key = (run.stage, run.attempt, run.keys.get("pack"), run.keys.get("runtime"))
        if key not in self._stages:
            model, tok = self.compressed(run)
            self._stages[key] = (self.deploy(model, runtime["path"]), tok)
        return self._stages[key]

    def compressed(self, run):
        """The torch model carrying ``run``'s decoded weights (the base model for the baseline)."""
        key = (run.stage, run.attempt, run.keys.get("pack"))
        if key not in self._stages:
            from edgebuild.compress.packing import apply_records
            model, tok = self.base()
            if run.stage != "baseline":
                model = copy.deepcopy(model)
                apply_records(model, self.records(run))
            self._stages[key] = (model, tok)
        return self._stages[key]

    def records(self, run) -> list:
        """The records of ``run``'s packed weights, read from its artifact."""
        from edgebuild.device_agent import packed
        return packed.read(run.pack["path"])[1]

    def decoded(self, run) -> dict:
        """``{state-dict name: float32 array}`` of ``run``'s packed weights."""
        from edgebuild.device_agent import codecs
        return codecs.decode_all(self.records(run))
