"""`generate()` with the official LlamaGen signature, for people porting LlamaGen scripts."""

from __future__ import annotations

import torch

from .ar import ARSampler
from .logits import SamplingParams


@torch.no_grad()
def generate(model, cond, max_new_tokens, emb_masks=None, cfg_scale=1.0, cfg_interval=-1,
             temperature=1.0, top_k=0, top_p=1.0, sample_logits=True) -> torch.Tensor:
    """Same arguments and result as `autoregressive/models/generate.py:generate`: int32 tokens
    [B, max_new_tokens], sampled with the global RNG (so `torch.manual_seed` traces reproduce).
    Unlike the official function it leaves no KV cache attached to `model`."""
    params = SamplingParams(cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
                            top_k=top_k, top_p=top_p)
    out = ARSampler(sample=sample_logits)(model, cond, params=params, cond_mask=emb_masks,
                                         num_tokens=max_new_tokens)
    return out.tokens.to(torch.int32)
