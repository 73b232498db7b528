"""Samplers: turn a condition into image token ids through the generator's cached forward."""

from .ar import ARSampler
from .base import Sampler, SamplerOutput
from .generate import generate
from .logits import SamplingParams, logits_to_probs, process_logits
from .rng import RandomStreams, make_streams

from .gsd import GSDSampler
from .mcsjd import MCSJDSampler
from .sjd import SJDSampler

SAMPLERS = {"ar": ARSampler, "sjd": SJDSampler, "gsd": GSDSampler, "mcsjd": MCSJDSampler}


def get_sampler(name: str, **options) -> Sampler:
    """A sampler by name ('ar', ...), with its own options."""
    from ..errors import ArgenError

    if name not in SAMPLERS:
        raise ArgenError(f"unknown sampler {name!r}; available: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](**options)


__all__ = ["ARSampler", "SJDSampler", "GSDSampler", "MCSJDSampler", "Sampler", "SamplerOutput", "SamplingParams", "generate", "get_sampler",
           "logits_to_probs", "process_logits", "RandomStreams", "make_streams", "SAMPLERS"]
