"""Decode-step speed of a generator against its memory roofline, measured side by side.

At batch 1 a decode step reads every weight matrix once and does little arithmetic per byte,
so its floor is (bytes of weights read) / (memory bandwidth). The bandwidth is measured in the
same process, interleaved with the decode measurements, as a GEMV/skinny GEMM over one matrix
holding as many bytes as the model's weights: machines here are noisy, and only ratios taken
side by side mean anything.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..models import GPT
from ..samplers import ARSampler, SamplingParams

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def random_gpt(size: str = "GPT-B", vocab_size: int = 16384, num_classes: int = 1000, block_size: int = 256,
               dtype=torch.float32, seed: int = 0) -> GPT:
    """A generator with random weights (the official init zeroes the output layer, which would
    make every logit 0 and every greedy token the same; redraw it too)."""
    torch.manual_seed(seed)
    model = GPT.from_name(size, vocab_size=vocab_size, num_classes=num_classes, block_size=block_size)
    torch.nn.init.normal_(model.output.weight, std=0.02)
    return torch.nn.Module.to(model.eval(), dtype)  # diffusers' ModelMixin.to warns on every dtype cast


def weight_bytes_per_step(model: GPT) -> int:
    """Bytes of weights one decode step must read: every Linear (layers and output) plus norms.
    Embedding tables are gathered by row, so they contribute one row per token, i.e. nothing."""
    total = 0
    for name, p in model.named_parameters():
        if "embedding" in name:
            continue
        total += p.numel() * p.element_size()
    return total


class Roofline:
    """Times a matmul of `rows` activations against one [out, dim] matrix of `nbytes` bytes."""

    def __init__(self, nbytes: int, dim: int, rows: int, dtype):
        elem = torch.tensor([], dtype=dtype).element_size()
        out = max(1, nbytes // (elem * dim))
        self.weight = torch.randn(out, dim).to(dtype)
        self.x = torch.randn(rows, dim).to(dtype)
        self.nbytes = out * dim * elem

    def time_once(self) -> float:
        start = time.perf_counter()
        torch.nn.functional.linear(self.x, self.weight)
        return time.perf_counter() - start


@dataclass
class DecodeResult:
    label: str
    batch_size: int
    rows: int
    ms_per_step: float
    tokens_per_s: float
    roofline_ms: float
    vs_roofline: float
    gemv_gb_per_s: float
    weight_mb: float


def _decode_steps(model, cond, params, n_steps: int):
    """Prefill, then time each of `n_steps` single-token decode steps (CFG batch included)."""
    rows = cond.shape[0] * (2 if params.uses_cfg else 1)
    both = torch.cat([cond, model.null_condition(cond)]) if params.uses_cfg else cond
    cache = model.new_cache(rows)  # full length: one static shape for compiled variants
    model.prefill(both, cache)
    token = torch.zeros(rows, 1, dtype=torch.long)
    pos = torch.tensor([1])
    times = []
    for _ in range(n_steps):
        start = time.perf_counter()
        logits = model.decode(token, pos, cache)
        token = logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
        pos += 1
    return times


@torch.no_grad()
def bench_decode(model, label: str, batch_size: int, params: SamplingParams, tokens: int = 256,
                 rounds: int = 5) -> DecodeResult:
    """Alternate decode runs and roofline GEMVs `rounds` times; report medians of each."""
    rows = batch_size * (2 if params.uses_cfg else 1)
    nbytes = weight_bytes_per_step(model)
    roof = Roofline(nbytes, model.token_embeddings().shape[1], rows, model.dtype)
    cond = torch.arange(batch_size) % model.num_classes
    _decode_steps(model, cond, params, 8)  # warm-up
    for _ in range(3):
        roof.time_once()
    step_times, roof_times = [], []
    per_round = max(8, (tokens - 1) // rounds)
    for _ in range(rounds):
        roof_times += [roof.time_once() for _ in range(3)]
        step_times += _decode_steps(model, cond, params, per_round)
        roof_times += [roof.time_once() for _ in range(3)]
    step = statistics.median(step_times)
    roof_t = statistics.median(roof_times)
    bandwidth = roof.nbytes / roof_t
    roofline = nbytes / bandwidth
    return DecodeResult(label=label, batch_size=batch_size, rows=rows, ms_per_step=step * 1e3,
                        tokens_per_s=batch_size / step, roofline_ms=roofline * 1e3, vs_roofline=step / roofline,
                        gemv_gb_per_s=bandwidth / 1e9, weight_mb=nbytes / 1e6)


@torch.no_grad()
def greedy_tokens(model, batch_size: int, params: SamplingParams, tokens: int) -> torch.Tensor:
    cond = torch.arange(batch_size) % model.num_classes
    return ARSampler(sample=False)(model, cond, params=params, num_tokens=tokens).tokens


def markdown_table(results) -> str:
    lines = ["| variant | batch | ms / step | tokens/s | roofline ms | step / roofline | GEMV GB/s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.label} | {r.batch_size} | {r.ms_per_step:.2f} | {r.tokens_per_s:.1f} | "
                     f"{r.roofline_ms:.2f} | {r.vs_roofline:.3f} | {r.gemv_gb_per_s:.1f} |")
    return "\n".join(lines)


def run(size="GPT-B", batch_sizes=(1, 8), tokens=256, cfg_scale=2.0, variants=("fp32", "bf16"),
        compile_model=False, rounds=5, check_tokens=32, log=print):
    """Benchmark every variant and batch size; check each variant's greedy tokens against fp32."""
    params = SamplingParams(cfg_scale=cfg_scale)
    reference = random_gpt(size)
    results, agreement = [], {}
    ref_tokens = greedy_tokens(reference, 2, params, check_tokens)
    for variant in variants:
        model = reference if variant == "fp32" else random_gpt(size, dtype=DTYPES[variant])
        label = variant
        if compile_model:
            model.compile_decode()
            label += "+compile"
        same = greedy_tokens(model, 2, params, check_tokens)
        agreement[label] = float((same == ref_tokens).float().mean())
        for bs in batch_sizes:
            result = bench_decode(model, label, bs, params, tokens, rounds)
            log(f"{label} batch {bs}: {result.ms_per_step:.2f} ms/step, {result.vs_roofline:.3f}x roofline")
            results.append(result)
    return results, agreement


def to_records(results):
    return [asdict(r) for r in results]
