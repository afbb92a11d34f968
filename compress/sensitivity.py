"""Which decoder layers a compressed stage hurts most: the KL divergence of the model's next-token
distributions when only one layer's tensors take their compressed values, layer by layer, on a few
calibration texts. The search keeps the most sensitive layers at a higher-bit encoding."""
from __future__ import annotations

import re

LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a state-dict name belongs to (None: not a layer's tensor)."""
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_sensitivity(model, decoded: dict, tokenizer, texts: list[str], max_tokens: int = 64) -> list:
    """``[(layer, kl)]``, most sensitive first: KL(model || model with layer's tensors from
    ``decoded``) averaged over every position of ``texts``. ``model`` is left as it was."""
    import torch

    batches = [tokenizer(t, return_tensors="pt")["input_ids"][:, :max_tokens] for t in texts]
    reference = [_logprobs(model, ids) for ids in batches]
    by_layer: dict = {}
    for name in decoded:
        if layer_of(name) is not None:
            by_layer.setdefault(layer_of(name), []).append(name)
    params = model.state_dict(keep_vars=True)
    out = []
    for layer, names in sorted(by_layer.items()):
        saved = {n: params[n].detach().clone() for n in names}
        with torch.no_grad():
            for n in names:
                params[n].copy_(torch.from_numpy(decoded[n].copy()))
            kl = sum(_kl(ref, _logprobs(model, ids)) for ref, ids in zip(reference, batches))
            for n in names:
                params[n].copy_(saved[n])
        out.append((layer, float(kl) / sum(ids.shape[1] for ids in batches)))
    return sorted(out, key=lambda item: -item[1])


def _logprobs(model, ids):
    import torch
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits[0].float(), dim=-1)


def _kl(ref, other) -> float:
    """Sum over positions of KL(ref || other)."""
    return float((ref.exp() * (ref - other)).sum())
