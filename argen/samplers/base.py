"""What every sampler shares: the call signature, the result type and CFG batch building.

A sampler turns a condition into image token ids by calling the generator only through its
sampling contract (`new_cache`, `prefill`, `decode`; see `argen.models.gpt`). Callers
(pipelines, evaluation, benchmarks) hold a `Sampler` and never need to know which one it is.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..errors import ArgenError
from .logits import SamplingParams
from .rng import GeneratorArg, RandomStreams, make_streams


@dataclass
class SamplerOutput:
    """tokens: [B, N] int64. num_forward_passes: model calls for the whole batch, prefill
    included (NFE). accepted_per_forward: tokens emitted per forward per sample, one entry per
    decode forward (1.0 throughout for plain AR). forwards_per_sample: [B], the forward pass
    after which each sample was complete (ragged speculative batches finish rows at different
    times; None means every row took num_forward_passes)."""

    tokens: torch.Tensor
    num_forward_passes: int
    accepted_per_forward: list = field(default_factory=list)
    forwards_per_sample: Optional[torch.Tensor] = None

    @property
    def nfe_per_sample(self) -> torch.Tensor:
        if self.forwards_per_sample is not None:
            return self.forwards_per_sample
        return torch.full((self.tokens.shape[0],), self.num_forward_passes)

    @property
    def mean_accepted_per_forward(self) -> float:
        values = self.accepted_per_forward
        return sum(values) / len(values) if values else 0.0


def cfg_batch(model, cond: torch.Tensor, cond_mask: Optional[torch.Tensor], params: SamplingParams):
    """[cond ; null(cond)] when guidance is on (conditional half first, as LlamaGen), else cond."""
    if not params.uses_cfg:
        return cond, cond_mask
    both = torch.cat([cond, model.null_condition(cond)])
    mask = None if cond_mask is None else torch.cat([cond_mask, cond_mask])
    return both, mask


class Sampler(abc.ABC):
    """Base class. Subclasses implement `_sample` and may take their own options in __init__."""

    name: str = "sampler"

    @torch.no_grad()
    def __call__(self, model, cond: torch.Tensor, *, params: SamplingParams = SamplingParams(),
                 cond_mask: Optional[torch.Tensor] = None, num_tokens: Optional[int] = None,
                 seeds: Optional[Sequence[int]] = None, generator: GeneratorArg = None,
                 progress: bool = False) -> SamplerOutput:
        """Sample `num_tokens` image tokens (default: the model's block_size) for each condition.

        cond: class ids [B] (c2i) or caption features [B, T, D] (t2i) with `cond_mask` [B, T].
        seeds / generator: per-sample random streams (same sample whatever the batch size);
        neither: the global RNG, drawn exactly as official LlamaGen does.
        """
        config = model.gpt_config
        num_tokens = config.block_size if num_tokens is None else int(num_tokens)
        if not 1 <= num_tokens <= config.block_size:
            raise ArgenError(f"num_tokens must be in 1..{config.block_size}, got {num_tokens}")
        if params.uses_cfg and not model.supports_cfg:
            raise ArgenError("cfg_scale > 1 needs a model trained with condition dropout (it has no null condition)")
        model.check_condition(cond, cond_mask)
        streams = make_streams(cond.shape[0], seeds, generator)
        return self._sample(model, cond, cond_mask, num_tokens, params, streams, progress)

    @abc.abstractmethod
    def _sample(self, model, cond, cond_mask, num_tokens: int, params: SamplingParams,
                streams: Optional[RandomStreams], progress: bool) -> SamplerOutput:
        ...
