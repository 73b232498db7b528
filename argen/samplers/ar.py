"""Plain autoregressive sampling with a KV cache: one forward pass per token.

Written as gpt-fast does: `prefill`, `decode_one_token`, `decode_n_tokens`, each short.
"""

from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from ..errors import ArgenError
from .base import Sampler, SamplerOutput, SettledGuards, cfg_batch, cfg_halves, compiled_step
from .logits import SamplingParams, logits_to_probs
from .rng import RandomStreams, sample_from_probs, sample_rows


def next_token(logits: torch.Tensor, params: SamplingParams, guided,
               streams: Optional[RandomStreams], sample: bool = True) -> torch.Tensor:
    """Model logits [B', V] or [B', k, V] (both CFG halves) -> tokens [B] or [B, k]."""
    probs = logits_to_probs(logits, params, guided)
    if not sample:
        return probs.argmax(dim=-1)
    return sample_from_probs(probs, streams)


def prefill(model, cond, cond_mask, cache, params, streams, sample=True, num_tokens=1) -> torch.Tensor:
    logits = model.prefill(cond, cache, cond_mask)
    return next_token(logits, params, params.guidance_at(0, num_tokens), streams, sample)


def decode_one_token(model, token, input_pos, cache, params, guided, streams, sample=True, step=None) -> torch.Tensor:
    """token [B] (or [B, k] codes) at position input_pos [1] -> the next one, same shape. `step`:
    `sample_step` compiled with the model (`decode_n_tokens`), taken when it draws the same tokens
    (random streams, a fixed guidance: a scale varying per step would build a graph per value)."""
    if step is not None and sample and streams is not None and isinstance(guided, bool):
        return step(model, token, input_pos, cache, params, guided,
                    streams.uniform(*token.shape[1:], device=token.device))
    return next_token(next_logits(model, token, input_pos, cache, params), params, guided, streams, sample)


def next_logits(model, token, input_pos, cache, params) -> torch.Tensor:
    """The model's logits [B', V] (or [B', k, V]) for the position after `token`, both CFG halves."""
    return model.decode(cfg_halves(token.unsqueeze(1), params.uses_cfg), input_pos, cache)[:, -1]


def sample_step(model, token, input_pos, cache, params, guided, u) -> torch.Tensor:
    """`decode_one_token` with the draw's uniforms u [B(, k)] given: the forward, CFG, the
    probabilities and the inverse CDF in one function, so a compiled model compiles it as one
    graph. The sampling's dozen small ops then cost little beside the forward (default-c2i,
    batch 1, fp32, inductor's GEMMs: 63 steps in 44.2 against 51.7 ms; the same tokens)."""
    logits = next_logits(model, token, input_pos, cache, params)
    return sample_rows(logits_to_probs(logits, params, guided), u)


def decode_n_tokens(model, first, cond_len, num_tokens, cache, params, streams, sample=True, progress=False):
    """Emit positions 1..num_tokens-1 after `first` [B] (or [B, k]); returns [B, num_tokens(, k)]."""
    tokens = torch.empty(first.shape[0], num_tokens, *first.shape[1:], dtype=torch.long, device=first.device)
    tokens[:, 0] = first
    input_pos = torch.tensor([cond_len], device=first.device)
    step = compiled_step(model, sample_step)
    with SettledGuards(step is not None) as settled:
        for n in tqdm(range(1, num_tokens), disable=not progress, desc="tokens", leave=False):
            guided = params.guidance_at(n, num_tokens)
            settled.before_step(guided)
            tokens[:, n] = decode_one_token(model, tokens[:, n - 1], input_pos, cache, params, guided, streams,
                                            sample, step)
            input_pos += 1
    return tokens


class ARSampler(Sampler):
    """One position per forward pass (all k codes of it at once), batched, CFG-aware.
    `sample=False` picks the argmax."""

    name = "ar"
    multi_code = True

    def __init__(self, sample: bool = True):
        if not isinstance(sample, bool):
            raise ArgenError(f"sample must be true or false, got {sample!r}")
        self.sample = sample

    def _sample(self, model, cond, cond_mask, num_tokens, params, streams, progress) -> SamplerOutput:
        cond_all, mask_all = cfg_batch(model, cond, cond_mask, params)
        cond_len = model.condition_length(cond)
        cache = model.new_cache(cond_all.shape[0], cond_len + num_tokens)
        first = prefill(model, cond_all, mask_all, cache, params, streams, self.sample, num_tokens)
        tokens = decode_n_tokens(model, first, cond_len, num_tokens, cache, params, streams, self.sample, progress)
        return SamplerOutput(tokens=tokens.flatten(1), num_forward_passes=num_tokens,
                             accepted_per_forward=[1.0] * (num_tokens - 1))
