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
from typing import Callable, List, Optional, Sequence

import torch

from ..atomic import SIGNATURE, atomic_write, atomic_write_json, sign_json
from ..errors import ArgenError
from ..samplers import SamplingParams
from ..samplers.base import cfg_batch, cfg_halves
from ..samplers.spec import SamplerSpec, make_sampler, parse_spec  # noqa: F401  (re-exported)


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
    nfe_images: Optional[int] = None  # images NFE and compression were averaged over (the quality set)
    fid: Optional[float] = None
    inception_score: Optional[float] = None
    class_accuracy: Optional[float] = None
    # Several models in one run (`--model a,b`): the model, and the speed-up against the first
    # model's AR (`wallclock_speedup` stays against the record's own model's AR).
    model: Optional[str] = None
    speedup_vs_first_ar: Optional[float] = None
    decode_included: bool = False  # timed region includes tokens -> images (tokenizer decode)
    num_tokens: Optional[int] = None  # images sampled as this many leading tokens (a prefix tokenizer); None: all
    draft_nfe_per_image: Optional[float] = None  # forwards of a draft model per image (`draft` sampler), not in NFE

    @property
    def model_label(self) -> Optional[str]:
        """The model's name, with the prefix length when only the first k tokens were sampled."""
        return None if self.model is None else self.model + ("" if self.num_tokens is None else f" (k = {self.num_tokens})")

    def to_json(self) -> dict:
        out = asdict(self)
        out["is"] = out.pop("inception_score")
        return out


def run_sampler(pipe, sampler, conds, params: SamplingParams, batch_size: int, seeds: Sequence[int],
                decode: bool = False, num_tokens: Optional[int] = None):
    """All images in batches through the pipeline's sampling path; returns tokens, per-image
    NFE, accepted-per-forward values, seconds (with `decode`: including tokens -> images, in the
    same batches) and the per-image draft-model forwards (None without a draft model).
    `num_tokens`: sample only the first n tokens of each image (`ARPipeline.sample_tokens`)."""
    start = time.perf_counter()
    out = pipe.sample_tokens(conds, seeds, sampler, params, batch_size, num_tokens=num_tokens)
    if decode:
        for i in range(0, len(seeds), batch_size):
            pipe.tokens_to_images(out.tokens[i:i + batch_size], conds[i:i + batch_size], seeds[i:i + batch_size])
    seconds = time.perf_counter() - start
    drafts = None if out.draft_forwards_per_sample is None else out.draft_forwards_per_sample.float()
    return out.tokens, out.nfe_per_sample.float(), list(out.accepted_per_forward), seconds, drafts


def benchmark_conditions(pipe, num_images: int):
    """Class-balanced labels, or held-out paraphrase prompts cycled over classes (text); the
    conditions' labels are class ids either way (for class accuracy)."""
    if pipe.is_text_to_image:
        from ..data.captions import HELDOUT_PROMPTS

        classes = sorted(HELDOUT_PROMPTS)
        prompts = [HELDOUT_PROMPTS[classes[i % len(classes)]][(i // len(classes)) % len(HELDOUT_PROMPTS[classes[0]])]
                   for i in range(num_images)]
        conds = pipe.conditions(prompt=prompts, num_images=1)
        conds.labels = [classes[i % len(classes)] for i in range(num_images)]
        return conds
    num_classes = pipe.generator.num_classes
    return pipe.conditions(class_labels=[i % num_classes for i in range(num_images)], num_images=1)


def _nfe_stats(nfe: torch.Tensor, ar_nfe: float, drafts: Optional[torch.Tensor] = None) -> dict:
    return {"nfe_per_image": nfe.mean().item(), "step_compression": ar_nfe / nfe.mean().item(),
            "draft_nfe_per_image": None if drafts is None else drafts.mean().item()}


def bench_samplers(pipe, specs: Sequence[SamplerSpec], batch_sizes: Sequence[int], num_images: int,
                   params: SamplingParams, rounds: int = 3, seed: int = 0,
                   quality: Optional[Callable[[torch.Tensor, List[int]], dict]] = None, quality_images: int = 0,
                   log: Callable[[str], None] = print, decode: bool = False,
                   model_params: Optional[dict] = None, num_tokens: Optional[int] = None) -> List[Record]:
    """Measure every spec at every batch size.

    Speed: `num_images` images per setting, `rounds` timed rounds after a warm-up, each interleaving the
    settings batch by batch.
    `decode`: the timed region also turns the tokens into images (the tokenizer's decode).
    Quality (when `quality(images, labels) -> {fid, is, class_accuracy}` is given): each setting
    samples `quality_images` images once, untimed, at the largest batch size (a sample does not
    depend on the batch size), and its NFE and step compression are then taken over that larger
    set, which estimates them more precisely than the timing images.

    `pipe` may be a dict {model name: pipeline}: every (model, spec) pair is timed in the same
    interleaved rounds on the same conditions and seeds; records carry the model's name and the
    speed-up against the first model's AR; `model_params` {name: SamplingParams} overrides `params`
    per model (each model's own default CFG).

    `num_tokens`: every model whose tokenizer decodes prefixes (FlexTok) samples only its first n
    tokens per image (the `--num-tokens` of `argen generate`); the others sample whole sequences,
    so one run compares, say, flextok-c2i at k = 4 with default-c2i.
    """
    pipes = pipe if isinstance(pipe, dict) else {None: pipe}
    prefix = {name: p.check_num_tokens(num_tokens) if num_tokens is not None and p.tokenizer.accepts_prefixes
              else None for name, p in pipes.items()}
    if num_tokens is not None and not any(prefix.values()):
        next(iter(pipes.values())).check_num_tokens(num_tokens)  # its one-line error says why
    if not any(s.name == "ar" and not s.options for s in specs):
        specs = [SamplerSpec("ar", {}, "ar")] + list(specs)
    par = {name: (model_params or {}).get(name, params) for name in pipes}
    total = max(num_images, quality_images if quality is not None else 0)
    conds = {name: benchmark_conditions(p, total) for name, p in pipes.items()}
    seeds = [seed + i for i in range(total)]
    records = []
    first = next(iter(pipes))
    for bs in batch_sizes:
        runs = {(name, s.label): (p, make_sampler(s)) for name, p in pipes.items() for s in specs}

        def tag(key):
            return key[1] if key[0] is None else f"{key[0]}/{key[1]}"

        for key, (p, sampler) in runs.items():  # warm-up round, not timed
            run_sampler(p, sampler, conds[key[0]][:bs], par[key[0]], bs, seeds[:bs], decode, prefix[key[0]])
        times = {key: [] for key in runs}
        results = {}
        for r in range(rounds):
            # Interleaved batch by batch, not setting by setting: the hosts' speed drifts by tens of percent
            # within seconds, and a setting that ran all its images in one stretch would meet another phase of
            # the host than the setting it is compared with. Each batch of images runs once in every setting,
            # in alternating order, and a round's time for a setting is the sum over its batches.
            seconds = {key: 0.0 for key in runs}
            parts = {key: [] for key in runs}
            for i, lo in enumerate(range(0, num_images, bs)):
                hi = min(lo + bs, num_images)
                for key in (list(runs) if i % 2 == 0 else list(reversed(runs))):
                    p, sampler = runs[key]
                    _, nfe, accepted, spent, drafts = run_sampler(p, sampler, conds[key[0]][lo:hi], par[key[0]], bs,
                                                                  seeds[lo:hi], decode, prefix[key[0]])
                    seconds[key] += spent
                    parts[key].append((nfe, accepted, drafts))
            for key in runs:
                times[key].append(seconds[key])
                results[key] = _joined(parts[key])
            log(f"batch {bs} round {r + 1}/{rounds}: " + ", ".join(f"{tag(k)} {v[-1]:.2f}s" for k, v in times.items()))
        first_ar = statistics.median(times[(first, "ar")])
        for name in pipes:
            ar_nfe = results[(name, "ar")][0].mean().item()
            ar_seconds = statistics.median(times[(name, "ar")])
            for spec in specs:
                nfe, accepted, drafts = results[(name, spec.label)]
                seconds = statistics.median(times[(name, spec.label)])
                records.append(Record(
                    sampler=spec.name, params=spec.options, batch_size=bs, num_images=num_images,
                    accepted_per_forward=sum(accepted) / len(accepted) if accepted else 0.0,
                    seconds_per_image=seconds / num_images, images_per_second=num_images / seconds,
                    wallclock_speedup=ar_seconds / seconds, seconds_rounds=times[(name, spec.label)],
                    model=name, speedup_vs_first_ar=None if name is None else first_ar / seconds,
                    decode_included=decode, num_tokens=prefix[name], **_nfe_stats(nfe, ar_nfe, drafts)))
    if quality is not None and quality_images:
        for name, p in pipes.items():
            mine = [r for r in records if r.model == name]
            _add_quality(p, specs, mine, conds[name][:quality_images], seeds[:quality_images], par[name],
                         max(batch_sizes), quality, log, prefix[name])
    return records


def _joined(parts: list) -> tuple:
    """(NFE per image, accepted per forward, draft forwards per image or None) of a setting over its batches,
    from each batch's (nfe, accepted, drafts)."""
    nfe = torch.cat([part[0] for part in parts])
    accepted = [a for part in parts for a in part[1]]
    drafts = None if parts[0][2] is None else torch.cat([part[2] for part in parts])
    return nfe, accepted, drafts


@torch.no_grad()
def _add_quality(pipe, specs, records, conds, seeds, params, batch_size, quality, log, num_tokens=None) -> None:
    """Sample the quality set once per setting; fill FID/IS/accuracy and the set's NFE into its records."""
    scored, ar_nfe = {}, None
    for spec in specs:
        start = time.perf_counter()
        tokens, nfe, accepted, _, drafts = run_sampler(pipe, make_sampler(spec), conds, params, batch_size, seeds,
                                                       num_tokens=num_tokens)
        scores = quality(pipe.tokens_to_images(tokens, conds, seeds), conds.labels)
        ar_nfe = nfe.mean().item() if spec.name == "ar" and not spec.options else ar_nfe
        scored[spec.label] = (scores, nfe, accepted, drafts)
        log(f"quality {spec.label}: {len(seeds)} images in {time.perf_counter() - start:.0f}s, "
            f"FID {scores.get('fid', float('nan')):.3f}")
    for spec in specs:
        scores, nfe, accepted, drafts = scored[spec.label]
        for record in records:
            if record.sampler == spec.name and record.params == spec.options:
                record.fid, record.inception_score = scores.get("fid"), scores.get("is")
                record.class_accuracy = scores.get("class_accuracy")
                for key, value in _nfe_stats(nfe, ar_nfe, drafts).items():
                    setattr(record, key, value)
                record.accepted_per_forward = sum(accepted) / len(accepted) if accepted else 0.0
                record.nfe_images = len(seeds)


@torch.inference_mode()  # as the samplers run their steps (`Sampler.__call__`)
def forward_cost(source, batch_sizes: Sequence[int], windows: Sequence[int] = (1, 2, 4, 8, 16), cfg: bool = True,
                 repeats: int = 30) -> List[dict]:
    """Time one decode forward of T positions per row against a 1-position forward, interleaved.

    This is the price of verifying a window: speculative sampling pays off in wall-clock only as
    far as a T-token forward costs less than T one-token forwards (memory-bound, on big models or
    accelerators); on a compute-bound CPU it costs nearly T times as much. `source`: a pipeline, or
    a bare class-conditional generator (`argen bench decode`'s random GPT). Returns one record per
    batch size: {batch_size, rows, ms_t1, cost: {T: time(T) / time(1)}}.
    """
    gen = getattr(source, "generator", source)
    n, codes = gen.num_positions, (gen.tokens_per_position,) if gen.tokens_per_position > 1 else ()
    out = []
    for bs in batch_sizes:
        if gen is source:
            labels, label_mask = torch.arange(bs) % gen.num_classes, None
        else:
            conds = benchmark_conditions(source, bs)
            labels, label_mask = conds.cond, conds.mask
        cond, mask = cfg_batch(gen, labels, label_mask, SamplingParams(cfg_scale=2.0 if cfg else 1.0))
        rows, cond_len = cond.shape[0], gen.condition_length(cond)
        cache = gen.new_cache(rows, cond_len + n)
        gen.prefill(cond, cache, mask)
        times = {t: [] for t in windows}
        for r in range(repeats + 1):
            for t in windows:
                start_pos = cond_len + (r * 7) % max(1, n - t)  # vary the attended length like a real run
                tokens = torch.zeros(rows, t, *codes, dtype=torch.long)
                pos = torch.arange(start_pos, start_pos + t)
                begin = time.perf_counter()
                gen.decode(tokens, pos, cache)
                if r:  # the first pass warms up
                    times[t].append(time.perf_counter() - begin)
        base = statistics.median(times[windows[0]])
        out.append({"batch_size": bs, "rows": rows, "ms_t1": base * 1e3,
                    "cost": {int(t): statistics.median(v) / base for t, v in times.items()}})
    return out


@torch.no_grad()
def target_entropy(pipe, num_images: int, params: SamplingParams, seed: int = 0) -> dict:
    """How predictable the model's next tokens are, along its own AR samples.

    One of the two things that limit speculative acceptance: a draft re-drawn from a broad row
    rarely matches. The other is how much a row moves when the tokens before it change; sweep
    `--temperature` (down to 0, where SJD is greedy Jacobi iteration) to tell them apart.
    Returns mean/median entropy (nats), mean top-1 probability and the share of positions whose
    top-1 probability exceeds 0.9, over `num_images` AR samples. The distributions come from the
    generator's cached forward: a prefill, then every sampled position in one decode call.
    """
    from ..samplers.logits import logits_to_probs

    gen = pipe.generator
    conds = benchmark_conditions(pipe, num_images)
    tokens = pipe.sample_tokens(conds, list(range(seed, seed + num_images)), "ar", params, num_images).tokens
    positions = tokens.view(num_images, gen.num_positions, -1).squeeze(-1)
    cond, mask = cfg_batch(gen, conds.cond, conds.mask, params)
    positions = cfg_halves(positions, params.uses_cfg)
    cache = gen.new_cache(cond.shape[0], gen.condition_length(cond) + gen.num_positions)
    first = gen.prefill(cond, cache, mask)
    start = gen.condition_length(cond)
    rest = gen.decode(positions[:, :-1], torch.arange(start, start + gen.num_positions - 1), cache)
    probs = logits_to_probs(torch.cat([first[:, None], rest], 1), params, params.uses_cfg)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    top1 = probs.max(-1).values
    return {"images": num_images, "mean_entropy_nats": entropy.mean().item(),
            "median_entropy_nats": entropy.median().item(), "mean_top1_prob": top1.mean().item(),
            "share_top1_above_0.9": (top1 > 0.9).float().mean().item()}


def forward_cost_table(curves: Sequence[dict]) -> str:
    windows = list(curves[0]["cost"])
    lines = ["| batch (rows) | ms per 1-token forward | " + " | ".join(f"T={t}" for t in windows) + " |",
             "|---|---|" + "---|" * len(windows)]
    for c in curves:
        lines.append(f"| {c['batch_size']} ({c['rows']}) | {c['ms_t1']:.2f} | "
                     + " | ".join(f"{c['cost'][t]:.2f}x" for t in windows) + " |")
    return "\n".join(lines)


def load_quality(path, expect: dict) -> dict:
    """FID/IS/class accuracy by (sampler, parameters) from an earlier `--fid` run's JSON whose
    settings match `expect` (model, cfg_scale, seed, decoder settings). One-line error on a mismatch."""
    try:
        data = json.loads(Path(path).read_text())
        meta, earlier = data["meta"], data["records"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArgenError(f"--quality-from {path}: not a sampler-benchmark JSON ({exc})") from None
    # JSONs from before these were recorded: right for one-pass decoders (fp32, nothing to set); a flow
    # decoder's settings are then unknown and the comparison refuses. Sampling settings other than the
    # guidance schedule (recorded on its own before) were then the defaults.
    absent = {"decoding": {}, "decoder_dtype": "fp32", "num_tokens": None,
              "sampling": {"cfg_interval": -1, "cfg_schedule": meta.get("cfg_schedule", "constant"),
                           "temperature": 1.0, "top_k": 0, "top_p": 1.0}}
    for key, value in expect.items():
        earlier_value = meta.get(key, absent.get(key, value))
        if earlier_value != value:
            raise ArgenError(f"--quality-from {path} was measured with {key}={earlier_value!r}, this run uses {value!r}")
    return {(rec["sampler"], json.dumps(rec["params"], sort_keys=True)): rec
            for rec in earlier if rec.get("fid") is not None}


def copy_quality(records: Sequence[Record], quality: dict) -> None:
    """Fill FID/IS/class accuracy of `records` from `load_quality`'s table (when it has the setting)."""
    for record in records:
        rec = quality.get((record.sampler, json.dumps(record.params, sort_keys=True)))
        if rec is not None:
            record.fid, record.inception_score, record.class_accuracy = rec["fid"], rec.get("is"), rec.get("class_accuracy")


def markdown_table(records: Sequence[Record]) -> str:
    multi = any(r.model is not None for r in records)
    head = ("| sampler | batch | NFE / image | step compression | accepted / forward | s / image | images / s "
            "| wall-clock speed-up | FID | IS | class acc. |")
    if multi:
        head = "| model " + head + " speed-up vs first model's AR |"
    lines = [head, "|" + "---|" * (13 if multi else 11)]

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    for r in records:
        label = r.sampler + (":" + ",".join(f"{k}={v}" for k, v in r.params.items()) if r.params else "")
        row = (f"| {label} | {r.batch_size} | {r.nfe_per_image:.1f} | {r.step_compression:.2f}x | "
               f"{r.accepted_per_forward:.2f} | {r.seconds_per_image:.3f} | {r.images_per_second:.2f} | "
               f"{r.wallclock_speedup:.2f}x | {fmt(r.fid, '.2f')} | {fmt(r.inception_score, '.2f')} | "
               f"{fmt(r.class_accuracy, '.1%')} |")
        if multi:
            row = f"| {r.model_label} " + row + f" {fmt(r.speedup_vs_first_ar, '.2f')}x |"
        lines.append(row)
    drafted = [r for r in records if r.draft_nfe_per_image is not None]
    if drafted:  # a draft model's forwards are not in NFE: say what they were
        lines.append("\nDraft-model forwards per image (not counted in NFE): " + ", ".join(
            f"{r.sampler}:{','.join(f'{k}={v}' for k, v in r.params.items())} batch {r.batch_size} "
            f"{r.draft_nfe_per_image:.1f}" for r in drafted) + ".")
    if not multi and records and records[0].num_tokens is not None:
        lines.append(f"\nEvery image: its first {records[0].num_tokens} tokens (a prefix tokenizer).")
    if any(r.decode_included for r in records):
        lines.append("\nTimes include decoding the tokens to images.")
    return "\n".join(lines)


def read_json(path) -> List[Record]:
    """Records back from `write_json` (e.g. to re-plot)."""
    data = json.loads(Path(path).read_text())
    out = []
    for rec in data["records"]:
        rec = dict(rec)
        rec["inception_score"] = rec.pop("is", None)
        out.append(Record(**rec))
    return out


def write_json(records: Sequence[Record], path, meta: Optional[dict] = None) -> None:
    atomic_write_json(path, sign_json({"meta": meta or {}, "records": [r.to_json() for r in records]}))


def plot(records: Sequence[Record], path) -> None:
    """Wall-clock speed-up against FID, one point per setting that has an FID; against step
    compression instead when no setting has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have_fid = any(r.fid is not None for r in records)
    skipped = sum(r.fid is None for r in records) if have_fid else 0
    if have_fid:
        records = [r for r in records if r.fid is not None]
    multi = any(r.model is not None for r in records)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    models = list(dict.fromkeys(r.model for r in records))
    markers = "osD^v<>"
    for bs in sorted({r.batch_size for r in records}):
        for mi, model in enumerate(models):
            rows = [r for r in records if r.batch_size == bs and r.model == model]
            xs = [r.fid if have_fid else r.step_compression for r in rows]
            # several models: speed-up against the first model's AR, so the models compare directly
            ys = [r.speedup_vs_first_ar if multi else r.wallclock_speedup for r in rows]
            ax.scatter(xs, ys, label=f"{rows[0].model_label}, batch {bs}" if multi and rows else f"batch {bs}",
                       marker=markers[mi % len(markers)])
            for r, x, y in zip(rows, xs, ys):
                tag = r.sampler + ("" if not r.params else ":" + ",".join(f"{k}={v}" for k, v in r.params.items()))
                ax.annotate(tag, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("FID (lower is better)" if have_fid else "step compression (x fewer forwards than AR)")
    ax.set_ylabel(f"wall-clock speed-up vs {models[0]} AR" if multi else "wall-clock speed-up vs AR")
    ax.axhline(1.0, color="grey", lw=0.5)
    if skipped:
        ax.set_title(f"{skipped} setting(s) without FID not shown", fontsize=8)
    ax.legend()
    fig.tight_layout()
    from .. import __version__

    # metadata lands as a PNG tEXt chunk "argen": the file is provably argen's, so a re-run may replace it
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120, metadata={SIGNATURE: __version__}))
    plt.close(fig)
