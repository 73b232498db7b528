"""Samplers: turn a condition into image token ids through the generator's cached forward."""

from ..errors import ArgenError
from .ar import ARSampler
from .base import Sampler, SamplerOutput
from .generate import generate
from .logits import SamplingParams, logits_to_probs, process_logits
from .rng import RandomStreams, make_streams

from .gsd import GSDSampler
from .mcsjd import MCSJDSampler
from .sjd import SJDSampler
from .spec import SamplerSpec, make_sampler, parse_spec

SAMPLERS = {"ar": ARSampler, "sjd": SJDSampler, "gsd": GSDSampler, "mcsjd": MCSJDSampler}


def get_sampler(name: str, **options) -> Sampler:
    """A sampler by name ('ar', 'sjd', ...) or spec ('gsd:G=10,L=8'), with keyword options on top."""
    if not isinstance(name, str):
        raise ArgenError(f"a sampler name is a string such as 'ar' or 'gsd:G=10', got {name!r}")
    spec = parse_spec(name) if ":" in name else SamplerSpec(name, {}, name)
    return make_sampler(SamplerSpec(spec.name, {**spec.options, **options}, name))


__all__ = ["ARSampler", "SJDSampler", "GSDSampler", "MCSJDSampler", "Sampler", "SamplerOutput", "SamplingParams", "generate", "get_sampler",
           "logits_to_probs", "process_logits", "RandomStreams", "make_streams", "SAMPLERS",
           "parse_spec"]
