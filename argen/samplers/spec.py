"""Samplers named by a short text spec, as on the command line: "gsd:G=10,L=8", "mcsjd:L=16", "ar"."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from ..errors import ArgenError


@dataclass
class SamplerSpec:
    name: str
    options: dict
    label: str


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_spec(text: str) -> SamplerSpec:
    """'gsd:G=10,L=16' -> SamplerSpec('gsd', {'group_size': 10, 'window': 16}, 'gsd:G=10,L=16').

    The sampler is built once here, so an unknown name or option fails now, in one line."""
    name, _, rest = text.strip().partition(":")
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ArgenError(f"bad sampler option {item!r} in {text!r}: use key=value")
        if not value.strip():
            raise ArgenError(f"sampler option {key.strip()!r} in {text!r} has no value: use key=value")
        if key.strip() in options:  # "gsd:G=3,G=4" (or --sampler-opt G=4 over it): which one was meant?
            raise ArgenError(f"sampler option {key.strip()!r} is given twice in {text!r}; give it once")
        options[key.strip()] = _parse_value(value.strip())
    spec = SamplerSpec(name, options, text.strip())
    make_sampler(spec)
    return spec


def make_sampler(spec: SamplerSpec):
    """Build the sampler a spec names; short option names (`L`, `G`) are the sampler class's own."""
    from .base import REGISTRY

    if spec.name not in REGISTRY:
        raise ArgenError(f"unknown sampler {spec.name!r}; available: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[spec.name]
    options = {}
    for key, value in spec.options.items():
        name = cls.option_aliases.get(key, key)
        if name in options:  # "gsd:G=3,group_size=4": a short name and its long one
            raise ArgenError(f"sampler {spec.label!r} sets {name} twice; give it once")
        options[name] = value
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    unknown = [key for key in options if key not in accepted]
    if unknown:
        short = {v: k for k, v in cls.option_aliases.items()}
        names = ", ".join(f"{name} ({short[name]})" if name in short else name for name in accepted) or "none"
        raise ArgenError(f"sampler {spec.name!r} has no option {unknown[0]!r}; its options: {names}")
    try:
        return cls(**options)
    except ArgenError as err:
        raise ArgenError(f"sampler {spec.label!r}: {err}") from None
