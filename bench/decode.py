"""Batched decoding that drops finished rows.

``transformers``' ``generate`` keeps every row of a batch in every decoding step until the last
row has finished: with stop strings that rows reach at very different lengths (a short GSM8K
answer next to one that runs to the token limit), most of the batch's steps are spent on rows
whose answers are complete. ``decode`` takes finished rows out of the batch (and out of the
key/value cache) after every step, so each step costs what the unfinished rows need.

Greedy decoding gives the tokens ``generate`` gives (up to float rounding in the batch). Sampling
uses transformers' own temperature / top-k / top-p warpers and ``torch.multinomial``; its draws
differ from ``generate``'s (fewer rows draw per step) but are fixed by the torch seed.
"""
from __future__ import annotations

from typing import Callable

import torch

from edgebuild.core.models import cache_arg

SUPPORTED = {"do_sample", "temperature", "top_p", "top_k"}


def warpers(do_sample: bool, temperature=None, top_p=None, top_k=None) -> list:
    """transformers' logits warpers for the given sampling settings (none for greedy)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if not do_sample:
        return []
    out = []
    if temperature not in (None, 1.0):
        out.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        out.append(TopKLogitsWarper(int(top_k)))
    if top_p not in (None, 1.0):
        out.append(TopPLogitsWarper(float(top_p)))
    return out


def _next_tokens(logits: torch.Tensor, ids: torch.Tensor, chain: list, do_sample: bool) -> torch.Tensor:
    """Greedy or sampled next token of every row from its last-position logits."""
    if not do_sample:
        return logits.argmax(dim=-1)
    for warp in chain:
        logits = warp(ids, logits)
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1)[:, 0]


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_length: int,
           finished: Callable[[torch.Tensor], list[bool]], eos: set, pad_token_id: int,
           cache=None, do_sample: bool = False, **sampling) -> torch.Tensor:
    """``[batch, width]`` tokens: each row's prompt, its new tokens, then padding up to the
    longest row (at most ``max_length``), as ``generate`` returns them.

    ``finished(new_tokens)`` says, for the unfinished rows' new tokens so far (a tensor with one
    row each), which have reached a stop; a row also ends at a token in ``eos`` or at
    ``max_length``. ``cache`` may hold keys/values for a leading part of
    the prompt (a shared prefix)."""
    from transformers import DynamicCache

    batch, width = input_ids.shape
    out = torch.full((batch, max_length), pad_token_id, dtype=torch.long, device=input_ids.device)
    out[:, :width] = input_ids
    chain = warpers(do_sample, **sampling)
    cache = cache if cache is not None else DynamicCache()
    done = cache.get_seq_length()
    mask = attention_mask.clone()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cached = {cache_arg(model): cache}
    logits = model(input_ids=input_ids[:, done:], attention_mask=mask,
                   position_ids=positions[:, done:], logits_to_keep=1, **cached).logits[:, -1]
    active = torch.arange(batch, device=input_ids.device)
    next_pos = positions[:, -1] + 1
    step = width
    for step in range(width, max_length):
        token = _next_tokens(logits, out[active, :step], chain, do_sample)
        out[active, step] = token
        stop = torch.tensor(finished(out[active, width:step + 1]), dtype=torch.bool,
                            device=active.device)
        stop |= torch.tensor([int(t) in eos for t in token.tolist()], dtype=torch.bool,
                             device=active.device)
        keep = (~stop).nonzero()[:, 0]
        if len(keep) == 0 or step + 1 == max_length:
            break
        if len(keep) < len(active):
            cache.batch_select_indices(keep)
            active, mask, next_pos, token = active[keep], mask[keep], next_pos[keep], token[keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       **cached).logits[:, -1]
        next_pos = next_pos + 1
    return out[:, :step + 1]
