"""Decode-step speed of a generator against its memory floor, measured side by side.

At batch 1 a decode step must read every weight matrix once, whatever the number of rows (2 with
CFG), and does little arithmetic per byte. Its floor is therefore **one pass over the model's own
decode-step matrices at 1 row** (same shapes, same count, same storage format, through the same
kernel the model uses): `Floor`. Machines here are noisy, so every figure is timed interleaved
with the others in one process, in rounds, and reported as a median.

Session 2 compared against a single tall matrix holding as many bytes as the weights, multiplied
by all the step's rows (`OneMatrix`). On MKL a 2-row GEMM over one tall matrix streams slower than
a 1-row GEMV over the model's own matrices, so that reference was itself slow and the ratio
flattered; it is still reported ("old figure") so the two can be compared.

With `llamagen=PATH` (a checkout of the official LlamaGen code, never part of argen), the
official `generate()` and argen's `ARSampler` generate whole images with the same weights, the
same seed and the same settings, interleaved, and their ms per token are compared; in fp32 their
tokens must be identical, which the benchmark checks.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import ArgenError
from ..models import GPT
from ..models.base import COMPILE_MODES
from ..models.quant import WEIGHT_FORMATS, onednn_packable
from ..samplers import ARSampler, SamplingParams
from ..samplers.base import SettledGuards, cfg_halves


def random_gpt(size: str = "GPT-B", vocab_size: int = 16384, num_classes: int = 1000, block_size: int = 256,
               weights: str = "fp32", seed: int = 0) -> GPT:
    """A generator with random weights (the official init zeroes the output layer, which would
    make every logit 0 and every greedy token the same; redraw it too). Same `seed`, same fp32
    weights, whatever the weight format they are then stored in."""
    torch.manual_seed(seed)
    model = GPT.from_name(size, vocab_size=vocab_size, num_classes=num_classes, block_size=block_size)
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return model.eval().set_weight_format(weights)


def _matmul(linear) -> Callable:
    """The bare product of a decode-step linear, on an input already in its compute dtype."""
    if hasattr(linear, "matmul"):
        return linear.matmul
    return lambda x: F.linear(x, linear.weight)


def _weight_nbytes(linear) -> int:
    return sum(t.numel() * t.element_size() for t in linear.buffers()) + \
        sum(p.numel() * p.element_size() for p in linear.parameters())


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step must read: every decode-step linear (in its storage
    format, int8 scales included) plus the norm gains. Embedding tables are gathered by row, so
    they contribute one row per token, i.e. nothing."""
    total = sum(_weight_nbytes(m) for m in model.decode_linears())
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            total += p.numel() * p.element_size()
    return total


class Floor:
    """One pass over the model's own decode-step matrices at 1 row, each through its own kernel.

    This is what a decode step cannot avoid: every matrix read once. The input is one row in
    each layer's compute dtype (fp32 for fp32 linears, bf16 for bf16/int8 ones)."""

    def __init__(self, model):
        self.steps = []
        inputs = {}
        for linear in model.decode_linears():
            dtype = getattr(linear, "compute_dtype", linear.weight.dtype)
            key = (linear.in_features, dtype)
            if key not in inputs:
                inputs[key] = torch.randn(1, linear.in_features).to(dtype)
            self.steps.append((_matmul(linear), inputs[key]))
        self.nbytes = sum(_weight_nbytes(m) for m in model.decode_linears())
        self.matrices = len(self.steps)

    def time_once(self) -> float:
        start = time.perf_counter()
        for matmul, x in self.steps:
            matmul(x)
        return time.perf_counter() - start


class FastestFloor:
    """The same pass over the model's fp32 matrices at 1 row, through every fp32 kernel this CPU
    offers; the fastest is the honest floor of any fp32 implementation, whatever kernel the
    model itself uses: MKL `F.linear`, oneDNN-packed (1 row, and zero-padded to 4 rows, which
    oneDNN streams faster on some CPUs), and `mm(x, W^T)` on a pre-transposed copy."""

    def __init__(self, model):
        weights = [m.weight.detach() for m in model.decode_linears()]
        if any(w.dtype != torch.float32 for w in weights):
            raise ArgenError("FastestFloor needs a model with fp32 decode-step weights")
        inputs = {k: torch.randn(1, k) for k in {w.shape[1] for w in weights}}
        self.kernels = {"F.linear (MKL)": [(lambda x, w=w: F.linear(x, w), inputs[w.shape[1]]) for w in weights]}
        if all(onednn_packable(w) for w in weights):
            packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
            padded = {k: F.pad(x, (0, 0, 0, 3)) for k, x in inputs.items()}
            self.kernels["oneDNN packed"] = [(lambda x, p=p: _onednn(x, p), inputs[w.shape[1]])
                                             for w, p in zip(weights, packed)]
            self.kernels["oneDNN packed, padded to 4 rows"] = [(lambda x, p=p: _onednn(x, p), padded[w.shape[1]])
                                                               for w, p in zip(weights, packed)]
        transposed = [w.t().contiguous() for w in weights]
        self.kernels["mm(x, W^T copy)"] = [(lambda x, t=t: torch.mm(x, t), inputs[t.shape[0]]) for t in transposed]

    def timer(self, kernel: str) -> Callable:
        steps = self.kernels[kernel]

        def time_once() -> float:
            start = time.perf_counter()
            for matmul, x in steps:
                matmul(x)
            return time.perf_counter() - start
        return time_once


def _onednn(x, packed):
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class OneMatrix:
    """Session 2's reference: `rows` activations times one [out, dim] fp32 matrix of `nbytes` bytes."""

    def __init__(self, nbytes: int, dim: int, rows: int):
        out = max(1, nbytes // (4 * dim))
        self.weight = torch.randn(out, dim)
        self.x = torch.randn(rows, dim)
        self.nbytes = out * dim * 4

    def time_once(self) -> float:
        start = time.perf_counter()
        F.linear(self.x, self.weight)
        return time.perf_counter() - start


@dataclass
class DecodeResult:
    label: str
    batch_size: int
    rows: int
    ms_per_step: float
    tokens_per_s: float
    floor_ms: float  # this format's own floor (its matrices at 1 row)
    vs_floor: float
    fp32_floor_ms: Optional[float]  # the fp32 model's floor: what weight formats are measured against
    vs_fp32_floor: Optional[float]
    floor_gb_per_s: float
    weight_mb: float
    old_roofline_ms: Optional[float] = None  # session 2's one-tall-matrix reference (fp32 only)
    vs_old_roofline: Optional[float] = None
    # Fastest tenth of the steps and the fastest floor pass. On a loaded machine a step that is
    # longer than the scheduler's time slice is almost always preempted, so medians measure the
    # load; the fast tail still estimates the step's own cost (for steps of a few ms).
    p10_ms_per_step: Optional[float] = None
    min_floor_ms: Optional[float] = None
    p10_vs_min_floor: Optional[float] = None
    # The fastest fp32 kernel's 1-row pass over the same matrices (`FastestFloor`): the floor of
    # any fp32 implementation, whichever kernel this variant runs.
    fastest_floor_ms: Optional[float] = None
    fastest_floor_kernel: Optional[str] = None
    vs_fastest_floor: Optional[float] = None
    fp32_kernel_floors_ms: Optional[dict] = None  # every kernel's 1-row pass (FastestFloor), ms


@dataclass
class EndToEnd:
    label: str  # "official generate()" or an argen variant
    batch_size: int
    ms_per_token: float
    speedup_vs_official: Optional[float] = None
    same_tokens_as_official: Optional[bool] = None


@dataclass
class BenchReport:
    results: list
    end_to_end: list = field(default_factory=list)
    greedy_agreement: dict = field(default_factory=dict)
    load: Optional[dict] = None


def _decode_steps(model, cond, params, n_steps: int):
    """Prefill, then time each of `n_steps` single-token decode steps (CFG rows included)."""
    rows = cond.shape[0] * (2 if params.uses_cfg else 1)
    both = torch.cat([cond, model.null_condition(cond)]) if params.uses_cfg else cond
    cache = model.new_cache(rows)  # full length: one static shape for compiled variants
    model.prefill(both, cache)
    token = torch.zeros(rows, 1, dtype=torch.long)
    pos = torch.tensor([1])
    times = []
    with SettledGuards(getattr(model, "compiled_with", None) is not None) as settled:  # as sampling loops run
        for _ in range(n_steps):
            settled.before_step()
            start = time.perf_counter()
            logits = model.decode(token, pos, cache)
            token = logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
            pos += 1
    return times


def interleave(tasks: dict, rounds: int) -> dict:
    """Run every task once per round, rotating the order each round; collect each one's samples."""
    names = list(tasks)
    samples = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name] += list(tasks[name]())
    return samples


@torch.inference_mode()  # as the samplers run their steps (`Sampler.__call__`)
def bench_decode(models: dict, batch_sizes, params: SamplingParams, tokens: int = 256, rounds: int = 5,
                 old_roofline: bool = True) -> list:
    """Decode steps of every model (label -> generator) at every batch size, interleaved with the
    floor of each weight format and (fp32) the session-2 one-matrix reference; medians."""
    first = next(iter(models.values()))
    floors = {}  # one per weight format (a compiled model reads the same matrices as its eager twin)
    for model in models.values():
        floors.setdefault(model.weight_format, Floor(model))
    reference = [m for m in models.values() if m.weight_format == "fp32"]
    fp32_family = [m for m in models.values() if m.weight_format.startswith("fp32")]
    fastest = FastestFloor(fp32_family[0]) if fp32_family else None
    dim = first.token_embeddings().shape[1]
    per_round = max(8, (tokens - 1) // rounds)
    tasks = {}
    for label, model in models.items():
        for bs in batch_sizes:
            cond = torch.arange(bs) % model.num_classes
            _decode_steps(model, cond, params, 4)  # warm-up (and compile, for compiled variants)
            tasks[(label, bs)] = (lambda m=model, c=cond: _decode_steps(m, c, params, per_round))
    for fmt, floor in floors.items():
        floor.time_once()
        tasks[("floor", fmt)] = (lambda f=floor: [f.time_once() for _ in range(3)])
    if fastest is not None:
        for kernel in fastest.kernels:
            timer = fastest.timer(kernel)
            timer()
            tasks[("fastest", kernel)] = (lambda t=timer: [t() for _ in range(3)])
    old = {}
    if old_roofline and reference:
        for bs in batch_sizes:
            rows = bs * (2 if params.uses_cfg else 1)
            old[bs] = OneMatrix(weight_bytes_per_step(reference[0]), dim, rows)
            tasks[("old", bs)] = (lambda o=old[bs]: [o.time_once() for _ in range(3)])
    samples = interleave(tasks, rounds)
    med = {k: statistics.median(v) for k, v in samples.items()}
    p10 = {k: sorted(v)[len(v) // 10] for k, v in samples.items()}
    fp32_floor_t = med.get(("floor", "fp32"))
    kernel_t = {k[1]: t for k, t in med.items() if k[0] == "fastest"}
    best = min(kernel_t, key=kernel_t.get) if kernel_t else None
    results = []
    for label, model in models.items():
        fmt = model.weight_format
        floor_t = med[("floor", fmt)]
        for bs in batch_sizes:
            step = med[(label, bs)]
            rows = bs * (2 if params.uses_cfg else 1)
            r = DecodeResult(
                label=label, batch_size=bs, rows=rows, ms_per_step=step * 1e3, tokens_per_s=bs / step,
                floor_ms=floor_t * 1e3, vs_floor=step / floor_t,
                fp32_floor_ms=fp32_floor_t * 1e3 if fp32_floor_t else None,
                vs_fp32_floor=step / fp32_floor_t if fp32_floor_t else None,
                floor_gb_per_s=floors[fmt].nbytes / floor_t / 1e9, weight_mb=weight_bytes_per_step(model) / 1e6,
                p10_ms_per_step=p10[(label, bs)] * 1e3, min_floor_ms=min(samples[("floor", fmt)]) * 1e3,
                p10_vs_min_floor=p10[(label, bs)] / min(samples[("floor", fmt)]))
            if best is not None:
                r.fastest_floor_ms, r.fastest_floor_kernel = kernel_t[best] * 1e3, best
                r.vs_fastest_floor = step / kernel_t[best]
                r.fp32_kernel_floors_ms = {k: t * 1e3 for k, t in kernel_t.items()}
            if bs in old and fmt == "fp32":
                o = old[bs]
                roof = weight_bytes_per_step(model) / (o.nbytes / med[("old", bs)])
                r.old_roofline_ms, r.vs_old_roofline = roof * 1e3, step / roof
            results.append(r)
    return results


# ------------------------------------------------------------------ official LlamaGen, end to end


def load_official(path: str):
    """(GPT_models, generate) from a checkout of the official LlamaGen code at `path`."""
    root = Path(path)
    if not (root / "autoregressive" / "models" / "gpt.py").is_file():
        raise ArgenError(f"--llamagen {path}: no autoregressive/models/gpt.py there (a LlamaGen checkout is expected)")
    sys.path.insert(0, str(root))
    try:
        from autoregressive.models.generate import generate  # noqa: E402  (outside argen, by design)
        from autoregressive.models.gpt import GPT_models
    except Exception as err:  # their imports, their errors: one line
        raise ArgenError(f"--llamagen {path}: cannot import the official code: {err}") from None
    finally:
        sys.path.remove(str(root))
    return GPT_models, generate


def official_twin(model: GPT, size: str, path: str):
    """The official `Transformer` of `size` holding exactly `model`'s (fp32) weights."""
    GPT_models, generate = load_official(path)
    cfg = model.gpt_config
    twin = GPT_models[size](vocab_size=cfg.vocab_size, num_classes=cfg.num_classes, block_size=cfg.block_size)
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "freqs_cis" not in k]:
        raise ArgenError(f"official model does not take argen's weights: missing {missing}, unexpected {unexpected}")
    return twin.eval(), generate


@torch.no_grad()
def bench_end_to_end(models: dict, official, generate, batch_sizes, params: SamplingParams, tokens: int,
                     rounds: int, seed: int = 0) -> list:
    """Whole images (prefill + `tokens` steps, sampling with the global RNG seeded alike) by the
    official `generate()` and by argen's ARSampler for every variant, interleaved; ms per token.
    Records whether each argen variant drew exactly the official tokens."""
    kwargs = dict(cfg_scale=params.cfg_scale, cfg_interval=params.cfg_interval, temperature=params.temperature,
                  top_k=params.top_k, top_p=params.top_p)
    outputs = {}

    def official_run(cond, key):
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = generate(official, cond, tokens, **kwargs)
        outputs[key] = out.long()
        return [(time.perf_counter() - start) / tokens]

    def argen_run(model, cond, key):
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = ARSampler()(model, cond, params=params, num_tokens=tokens).tokens
        outputs[key] = out.long()
        return [(time.perf_counter() - start) / tokens]

    tasks = {}
    for bs in batch_sizes:
        cond = torch.arange(bs) % official.num_classes
        tasks[("official", bs)] = (lambda c=cond, b=bs: official_run(c, ("official", b)))
        for label, model in models.items():
            tasks[(label, bs)] = (lambda m=model, c=cond, k=(label, bs): argen_run(m, c, k))
    for task in tasks.values():  # warm-up (and compile)
        task()
    samples = interleave(tasks, rounds)
    med = {k: statistics.median(v) for k, v in samples.items()}
    records = []
    for bs in batch_sizes:
        off = med[("official", bs)]
        records.append(EndToEnd("official generate()", bs, off * 1e3))
        for label in models:
            same = bool(torch.equal(outputs[(label, bs)], outputs[("official", bs)]))
            records.append(EndToEnd(f"argen {label}", bs, med[(label, bs)] * 1e3, off / med[(label, bs)], same))
    return records


# ------------------------------------------------------------------ greedy agreement


@torch.inference_mode()  # as the samplers run their steps (`Sampler.__call__`)
def greedy_agreement(model, reference, batch_size: int, params: SamplingParams, tokens: int) -> dict:
    """Greedy tokens of `model` against `reference` (fp32), two ways:

    * free-running: both decode greedily on their own; the share of equal positions (one early
      difference changes every later token, so this compounds);
    * teacher-forced: `model` is fed the reference's greedy sequence, and its greedy choice is
      compared at each position (is the format's next-token decision the same, given the same past).
    """
    cond = torch.arange(batch_size) % reference.num_classes
    ref = ARSampler(sample=False)(reference, cond, params=params, num_tokens=tokens).tokens
    free = ARSampler(sample=False)(model, cond, params=params, num_tokens=tokens).tokens
    forced = _forced_greedy(model, cond, ref, params)
    first = (free != ref).float().argmax(1)
    first = torch.where((free == ref).all(1), torch.full_like(first, tokens), first)
    return {"free_running": float((free == ref).float().mean()),
            "teacher_forced": float((forced == ref).float().mean()),
            "first_difference": [int(v) for v in first]}


def _forced_greedy(model, cond, ref_tokens, params):
    rows = cond.shape[0] * (2 if params.uses_cfg else 1)
    both = torch.cat([cond, model.null_condition(cond)]) if params.uses_cfg else cond
    cache = model.new_cache(rows)

    def pick(logits):
        if params.uses_cfg:
            c, u = logits.chunk(2)
            logits = u + (c - u) * params.cfg_scale
        return logits.argmax(-1)

    out = [pick(model.prefill(both, cache))]
    t = model.condition_length(cond)
    for k in range(ref_tokens.shape[1] - 1):
        tok = ref_tokens[:, k:k + 1]
        tok = cfg_halves(tok, params.uses_cfg)
        logits = model.decode(tok, torch.tensor([t + k]), cache)[:, -1]
        out.append(pick(logits))
    return torch.stack(out, 1)


# ------------------------------------------------------------------ tables


def markdown_table(results) -> str:
    lines = ["| variant | batch | ms / step | tokens/s | floor ms (own format, 1 row) | step / floor | "
             "step / fp32 floor | floor GB/s | old: one-matrix ms | step / old | fastest 10% step ms | "
             "/ fastest floor | fastest fp32 1-row kernel ms | step / it |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        old = (f"{r.old_roofline_ms:.2f} | {r.vs_old_roofline:.3f}" if r.old_roofline_ms is not None else "– | –")
        vs32 = f"{r.vs_fp32_floor:.3f}" if r.vs_fp32_floor is not None else "–"
        fastest = (f"{r.fastest_floor_ms:.2f} ({r.fastest_floor_kernel}) | {r.vs_fastest_floor:.3f}"
                   if r.fastest_floor_ms is not None else "– | –")
        lines.append(f"| {r.label} | {r.batch_size} | {r.ms_per_step:.2f} | {r.tokens_per_s:.1f} | "
                     f"{r.floor_ms:.2f} | {r.vs_floor:.3f} | {vs32} | {r.floor_gb_per_s:.1f} | {old} | "
                     f"{r.p10_ms_per_step:.2f} | {r.p10_vs_min_floor:.3f} | {fastest} |")
    kernels = next((r.fp32_kernel_floors_ms for r in results if r.fp32_kernel_floors_ms), None)
    if kernels:
        lines.append("\nfp32 1-row pass over the same matrices, per kernel: "
                     + "; ".join(f"{k} {t:.2f} ms" for k, t in sorted(kernels.items(), key=lambda kv: kv[1])))
    return "\n".join(lines)


def end_to_end_table(records) -> str:
    lines = ["| generator | batch | ms / token | speed-up vs official | same tokens as official |",
             "|---|---|---|---|---|"]
    for r in records:
        speed = f"{r.speedup_vs_official:.2f}×" if r.speedup_vs_official is not None else "1.00×"
        same = "–" if r.same_tokens_as_official is None else ("yes" if r.same_tokens_as_official else "no")
        lines.append(f"| {r.label} | {r.batch_size} | {r.ms_per_token:.2f} | {speed} | {same} |")
    return "\n".join(lines)


def build_variants(size: str, variants, compile_modes=(), block_size: int = 256) -> dict:
    """label -> model: each weight format of the same random weights, plus a compiled copy per
    compile mode (`compiled_label`)."""
    models = {}
    for fmt in variants:
        if fmt not in WEIGHT_FORMATS:
            raise ArgenError(f"unknown variant {fmt!r}; choose from {', '.join(WEIGHT_FORMATS)}")
        models[fmt] = random_gpt(size, block_size=block_size, weights=fmt)
    for mode in compile_modes:
        for fmt in variants:
            model = random_gpt(size, block_size=block_size, weights=fmt)
            models[compiled_label(fmt, mode)] = model.compile_decode(mode)
    return models


def compiled_label(fmt: str, mode: str) -> str:
    """The variant label of weight format `fmt` compiled in `mode`: "bf16+compile", "bf16+max-autotune"."""
    return f"{fmt}+compile" if mode == "default" else f"{fmt}+{mode}"


def parse_compile_modes(text) -> list:
    """`--compile` of `argen bench decode`: None (no compiled variants) or comma-separated modes."""
    if text is None:
        return []
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in COMPILE_MODES]
    if bad or not modes:
        raise ArgenError(f"--compile: modes must be among {', '.join(COMPILE_MODES)}, got {text!r}")
    return modes


def to_records(items):
    return [asdict(r) for r in items]
