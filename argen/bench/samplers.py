"""Sampler comparison: forward passes, step compression and wall-clock, measured side by side.

Every sampler setting runs on the same conditions and per-sample seeds, in interleaved rounds
(AR included as the baseline in the same process), after a warm-up round; times are medians
over rounds. Quality (FID / IS / class accuracy) is optional and comes from `argen.eval`.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..errors import ArgenError
from ..samplers import SamplingParams, get_sampler

# Short parameter names accepted in specs such as "gsd:G=10,L=16".
ALIASES = {"G": "group_size", "L": "window"}


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
    """'gsd:G=10,L=16' -> SamplerSpec('gsd', {'group_size': 10, 'window': 16}, 'gsd:G=10,L=16')."""
    name, _, rest = text.strip().partition(":")
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ArgenError(f"bad sampler option {item!r} in {text!r}: use key=value")
        options[ALIASES.get(key.strip(), key.strip())] = _parse_value(value.strip())
    spec = SamplerSpec(name, options, text.strip())
    make_sampler(spec)  # fail now, in one line, on unknown names or options
    return spec


def make_sampler(spec: SamplerSpec):
    try:
        return get_sampler(spec.name, **spec.options)
    except TypeError as err:
        raise ArgenError(f"sampler {spec.name!r} does not take these options: {err}") from None


@dataclass
class Record:
    sampler: str
    params: dict
    batch_size: int
    num_images: int
    nfe_per_image: float
    step_compression: float
    accepted_per_forward: float
    seconds_per_image: float
    images_per_second: float
    wallclock_speedup: float
    seconds_rounds: list = field(default_factory=list)
    fid: Optional[float] = None
    inception_score: Optional[float] = None
    class_accuracy: Optional[float] = None

    def to_json(self) -> dict:
        out = asdict(self)
        out["is"] = out.pop("inception_score")
        return out


def run_sampler(gpt, sampler, cond, mask, params: SamplingParams, batch_size: int, seeds: Sequence[int]):
    """All images in batches; returns tokens, per-image NFE, accepted-per-forward values, seconds."""
    tokens, nfe, accepted = [], [], []
    start = time.perf_counter()
    for lo in range(0, cond.shape[0], batch_size):
        hi = min(lo + batch_size, cond.shape[0])
        out = sampler(gpt, cond[lo:hi], params=params, cond_mask=None if mask is None else mask[lo:hi],
                      seeds=list(seeds[lo:hi]))
        tokens.append(out.tokens)
        nfe.append(out.nfe_per_sample.float())
        accepted += list(out.accepted_per_forward)
    seconds = time.perf_counter() - start
    return torch.cat(tokens), torch.cat(nfe), accepted, seconds


def benchmark_conditions(pipe, num_images: int):
    """Class-balanced labels (c2i) or held-out paraphrase prompts cycled over classes (t2i)."""
    if pipe.is_text_to_image:
        from ..data.captions import HELDOUT_PROMPTS

        classes = sorted(HELDOUT_PROMPTS)
        prompts = [HELDOUT_PROMPTS[classes[i % len(classes)]][(i // len(classes)) % len(HELDOUT_PROMPTS[classes[0]])]
                   for i in range(num_images)]
        cond, mask, _ = pipe.prepare_conditions(prompt=prompts, num_images=1)
        labels = [classes[i % len(classes)] for i in range(num_images)]
        return cond, mask, labels
    num_classes = pipe.gpt.gpt_config.num_classes
    labels = [i % num_classes for i in range(num_images)]
    cond, mask, _ = pipe.prepare_conditions(class_labels=labels, num_images=1)
    return cond, mask, labels


def bench_samplers(pipe, specs: Sequence[SamplerSpec], batch_sizes: Sequence[int], num_images: int,
                   params: SamplingParams, rounds: int = 3, seed: int = 0,
                   quality: Optional[Callable[[torch.Tensor, List[int]], dict]] = None,
                   log: Callable[[str], None] = print) -> List[Record]:
    """Measure every spec at every batch size. `quality(images, labels) -> {fid, is, class_accuracy}`."""
    if not any(s.name == "ar" and not s.options for s in specs):
        specs = [SamplerSpec("ar", {}, "ar")] + list(specs)
    cond, mask, labels = benchmark_conditions(pipe, num_images)
    seeds = [seed + i for i in range(num_images)]
    records, quality_cache = [], {}
    for bs in batch_sizes:
        samplers = {s.label: make_sampler(s) for s in specs}
        for label, sampler in samplers.items():  # warm-up round, not timed
            run_sampler(pipe.gpt, sampler, cond[:bs], None if mask is None else mask[:bs], params, bs, seeds[:bs])
        times = {label: [] for label in samplers}
        results = {}
        for r in range(rounds):
            for label, sampler in samplers.items():
                tokens, nfe, accepted, seconds = run_sampler(pipe.gpt, sampler, cond, mask, params, bs, seeds)
                times[label].append(seconds)
                results[label] = (tokens, nfe, accepted)
            log(f"batch {bs} round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
        ar_nfe = results["ar"][1].mean().item()
        ar_seconds = statistics.median(times["ar"])
        for spec in specs:
            tokens, nfe, accepted = results[spec.label]
            seconds = statistics.median(times[spec.label])
            record = Record(
                sampler=spec.name, params=spec.options, batch_size=bs, num_images=num_images,
                nfe_per_image=nfe.mean().item(), step_compression=ar_nfe / nfe.mean().item(),
                accepted_per_forward=sum(accepted) / len(accepted) if accepted else 0.0,
                seconds_per_image=seconds / num_images, images_per_second=num_images / seconds,
                wallclock_speedup=ar_seconds / seconds, seconds_rounds=times[spec.label])
            if quality is not None:
                # samples do not depend on the batch size (per-sample seeds): score each setting once
                key = spec.label
                if key not in quality_cache:
                    quality_cache[key] = quality(pipe.decode(tokens), labels)
                q = quality_cache[key]
                record.fid, record.inception_score, record.class_accuracy = q.get("fid"), q.get("is"), q.get("class_accuracy")
            records.append(record)
    return records


def markdown_table(records: Sequence[Record]) -> str:
    head = ("| sampler | batch | NFE / image | step compression | accepted / forward | s / image | images / s "
            "| wall-clock speed-up | FID | IS | class acc. |")
    lines = [head, "|" + "---|" * 11]

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    for r in records:
        label = r.sampler + (":" + ",".join(f"{k}={v}" for k, v in r.params.items()) if r.params else "")
        lines.append(f"| {label} | {r.batch_size} | {r.nfe_per_image:.1f} | {r.step_compression:.2f}x | "
                     f"{r.accepted_per_forward:.2f} | {r.seconds_per_image:.3f} | {r.images_per_second:.2f} | "
                     f"{r.wallclock_speedup:.2f}x | {fmt(r.fid, '.2f')} | {fmt(r.inception_score, '.2f')} | "
                     f"{fmt(r.class_accuracy, '.1%')} |")
    return "\n".join(lines)


def write_json(records: Sequence[Record], path, meta: Optional[dict] = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"meta": meta or {}, "records": [r.to_json() for r in records]}, indent=2))
    tmp.replace(path)


def plot(records: Sequence[Record], path) -> None:
    """Wall-clock speed-up against FID (or against step compression when FID was not measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have_fid = all(r.fid is not None for r in records)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for bs in sorted({r.batch_size for r in records}):
        rows = [r for r in records if r.batch_size == bs]
        xs = [r.fid if have_fid else r.step_compression for r in rows]
        ys = [r.wallclock_speedup for r in rows]
        ax.scatter(xs, ys, label=f"batch {bs}")
        for r, x, y in zip(rows, xs, ys):
            tag = r.sampler + ("" if not r.params else ":" + ",".join(f"{k}={v}" for k, v in r.params.items()))
            ax.annotate(tag, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("FID (lower is better)" if have_fid else "step compression (x fewer forwards than AR)")
    ax.set_ylabel("wall-clock speed-up vs AR")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
