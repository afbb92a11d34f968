"""Calibration for VPTQ: token sequences from the calibration texts, and one forward pass that
collects ``H = 2 X Xᵀ / n`` from the input activations ``X`` of each linear layer."""
from __future__ import annotations

import contextlib
import logging

from edgebuild.core.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

BATCH_TOKENS = 4096          # tokens per forward batch


def token_stream(texts, tokenizer) -> list[int]:
    """Concatenate the token ids of ``texts`` (strings, or lists of token ids used as they are),
    separated by the tokenizer's end-of-sequence token when it has one."""
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    stream: list[int] = []
    for text in texts:
        if isinstance(text, str):
            if tokenizer is None:
                raise ConfigError("calibration texts are strings but no tokenizer was given",
                                  hint="pass the model's tokenizer, or token-id lists")
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids = [int(t) for t in text]
        if stream and eos is not None:
            stream.append(int(eos))
        stream.extend(ids)
    return stream


def calibration_batches(texts, tokenizer, samples: int, seq_len: int) -> list:
    """Cut the token stream of ``texts`` into at most ``samples`` sequences of ``seq_len`` tokens
    (a shorter stream gives one shorter sequence), batched by ``BATCH_TOKENS``; int64 tensors."""
    import torch

    stream = token_stream(texts, tokenizer)
    if not stream:
        raise ConfigError("the calibration texts hold no tokens",
                          hint="provide calibration texts for vptq")
    count = min(samples, len(stream) // seq_len)
    if count == 0:
        seqs = torch.tensor([stream[:seq_len]], dtype=torch.long)
    else:
        seqs = torch.tensor(stream[:count * seq_len], dtype=torch.long).reshape(count, seq_len)
    if count < samples:
        log.info("calibration uses %d sequence(s) of %d tokens (%d asked for)", len(seqs),
                 seqs.shape[1], samples)
    per_batch = max(1, BATCH_TOKENS // seqs.shape[1])
    return list(torch.split(seqs, per_batch))


class _Collector:
    """Forward pre-hooks summing ``XᵀX`` per linear layer. Layers fed the very same input tensor
    (``q``/``k``/``v``, ``gate``/``up``) share one sum."""

    def __init__(self, device):
        self.device = device
        self.sums: dict = {}
        self.tokens: dict = {}
        self.alias: dict = {}
        self.last = (None, None)

    def hook(self, name):
        import torch

        def fn(module, args):
            x = args[0]
            last_x, last_name = self.last
            if name in self.alias or (x is last_x and name not in self.sums):
                self.alias.setdefault(name, last_name)
                return
            flat = x.detach().reshape(-1, x.shape[-1]).to(self.device, dtype=torch.float32)
            if name not in self.sums:
                self.sums[name] = flat.new_zeros(flat.shape[1], flat.shape[1])
                self.tokens[name] = 0
            self.sums[name].addmm_(flat.T, flat)
            self.tokens[name] += flat.shape[0]
            self.last = (x, name)
        return fn

    def hessians(self, names) -> dict:
        """``{name: H}`` with ``H = 2 XᵀX / tokens`` (shared tensors for aliased layers)."""
        out = {}
        for name in names:
            src = self.alias.get(name, name)
            if src not in out:
                if src not in self.sums:
                    raise ModelError(f"layer {name!r} received no input during calibration; "
                                     "is it used by the model's forward pass?")
                out[src] = self.sums.pop(src).mul_(2.0 / self.tokens[src])
            out[name] = out[src]
        return out


@contextlib.contextmanager
def _eval_on(model, device):
    """Run ``model`` in eval mode on ``device``; restore its mode and device afterwards."""
    import torch

    was_training = model.training
    home = next(model.parameters()).device
    target = torch.device(device)
    model.eval()
    if home != target:
        model.to(target)
    try:
        yield target
    finally:
        if home != target:
            model.to(home)
        model.train(was_training)


def collect_hessians(model, module_names: list[str], batches, device) -> dict:
    """One forward pass of ``model`` over ``batches``; returns ``{module name: H}`` (float32 on
    ``device``) for each named ``nn.Linear``. Only the decoder body runs when every named layer
    lies inside it (no output head)."""
    import torch

    collector = _Collector(device)
    handles = [model.get_submodule(n).register_forward_pre_hook(collector.hook(n))
               for n in module_names]
    runner = _runner(model, module_names)
    try:
        with _eval_on(model, device) as target, torch.no_grad():
            for batch in batches:
                runner(input_ids=batch.to(target), use_cache=False)
                collector.last = (None, None)
    finally:
        for h in handles:
            h.remove()
    return collector.hessians(module_names)


def _runner(model, module_names):
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if body is not None and all(n.startswith(prefix + ".") for n in module_names):
        return body
    return model
