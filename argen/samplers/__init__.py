"""Samplers: turn a condition into image token ids through the generator's cached forward."""

from ..errors import ArgenError
from .base import REGISTRY, Sampler, SamplerOutput
from .generate import generate
from .logits import SamplingParams, logits_to_probs, process_logits
from .rng import RandomStreams, make_streams
from .spec import SamplerSpec, make_sampler, parse_spec

# Each sampler file registers its classes when imported.
from .ar import ARSampler
from .auto import AutoSampler
from .draft import DraftSampler
from .draft_gsd import GroupedDraftSampler
from .draft_pac import DraftPACSampler
from .gsd import GSDSampler
from .mcsjd import MCSJDSampler
from .pac import PACSampler
from .sjd import SJDSampler
from .spatial import SpatialSampler

SAMPLERS = REGISTRY  # name or alias -> class (read-only view for callers; samplers register themselves)


def get_sampler(name: str, **options) -> Sampler:
    """A sampler by name ('ar', 'sjd', ...) or spec ('gsd:G=10,L=8'), with keyword options on top."""
    if not isinstance(name, str):
        raise ArgenError(f"a sampler name is a string such as 'ar' or 'gsd:G=10', got {name!r}")
    spec = parse_spec(name) if ":" in name else SamplerSpec(name, {}, name)
    return make_sampler(SamplerSpec(spec.name, {**spec.options, **options}, name))


__all__ = ["ARSampler", "AutoSampler", "DraftSampler", "DraftPACSampler", "GroupedDraftSampler", "SJDSampler", "GSDSampler", "MCSJDSampler", "PACSampler", "SpatialSampler", "Sampler", "SamplerOutput", "SamplingParams", "generate", "get_sampler",
           "logits_to_probs", "process_logits", "RandomStreams", "make_streams", "SAMPLERS",
           "parse_spec"]
