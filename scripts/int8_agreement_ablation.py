"""Which error makes int8's greedy tokens differ from fp32's on GPT-B (random weights)?

Teacher-forced greedy agreement with MKL fp32 (the bench's measure: given fp32's past, is the
next greedy choice the same), for the shipped formats and for emulations that switch one error
source on at a time: the int8 weights (per output channel, or per group of input columns), the
bf16 cast of the activations, the bf16 rounding of the product's output, and which matrices are
quantised (the 60 body matrices, the output head). Emulations multiply in float32 with the
dequantised weights: slow, for accuracy only.

The "noise" rows bound what any 8-bit weight code could reach: every weight gets Gaussian noise of
rms eps x its row's rms. A Gaussian source coded at R bits a weight has rms error at least
2^-R of its rms (rate-distortion), 0.39% at 8 bits, whatever the code (vector quantisers
included); the best 8-bit scalar code (Lloyd-Max) reaches about 0.64%, per-channel absmax int8
about 0.73% (max |w| is about 3.2 rms over 768 inputs: 3.2 / 127 / sqrt(12)); bf16 rounding
about 0.11%.

    python scripts/int8_agreement_ablation.py --samples 8 --tokens 64
    python scripts/int8_agreement_ablation.py --configs "today;head"   # substrings of config names
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from argen.bench.decode import _forced_greedy, random_gpt
from argen.models.quant import BF16Linear, FP32PackedLinear, Int8Linear, quantize_int8
from argen.samplers import ARSampler, SamplingParams


def dequantized_groups(w, g):
    """int8 with one bf16 scale per group of g input columns, dequantised (fp32)."""
    o, i = w.shape
    wg = w.reshape(o, i // g, g)
    s = (wg.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12).to(torch.bfloat16).float()
    q = torch.round(wg / s).clamp(-127, 127)
    return (q * s).reshape(o, i)


class Emu(nn.Module):
    """A linear whose weights carry one format's error (pc: int8 per channel, gN: int8 per group of
    N, bf16, or none) and whose activations / outputs are optionally rounded to bf16; fp32 product."""

    def __init__(self, lin, weight="pc", act="fp32", out="fp32"):
        super().__init__()
        w = lin.weight.detach()
        if weight == "pc":
            q, s = quantize_int8(w)
            w = q.float() * s.float()[:, None]
        elif weight.startswith("g"):
            w = dequantized_groups(w, int(weight[1:]))
        elif weight == "bf16":
            w = w.bfloat16().float()
        self.w, self.act, self.out = w, act, out

    def forward(self, x):
        if self.act == "bf16":
            x = x.bfloat16().float()
        y = F.linear(x, self.w)
        return y.bfloat16().float() if self.out == "bf16" else y


class Noisy(nn.Module):
    """fp32 weights plus seeded Gaussian noise of rms `eps` x the row's rms (an error-size probe)."""

    seed = 0

    def __init__(self, lin, eps):
        super().__init__()
        w = lin.weight.detach()
        Noisy.seed += 1
        g = torch.Generator().manual_seed(Noisy.seed)
        rms = w.pow(2).mean(1, keepdim=True).sqrt()
        self.w = w + torch.randn(w.shape, generator=g) * rms * eps

    def forward(self, x):
        return F.linear(x, self.w)


class HiLo(Int8Linear):
    """int8 weights, activations as bf16 hi + bf16 lo through the same kernel."""

    def forward(self, x):
        flat = x.reshape(-1, self.in_features).float()
        hi = flat.bfloat16()
        lo = (flat - hi.float()).bfloat16()
        n = flat.shape[0]
        y = torch._weight_int8pack_mm(torch.cat([hi, lo]), self.weight, self.scales).float()
        return (y[:n] + y[n:]).reshape(*x.shape[:-1], self.out_features)


def build(body, head):
    """GPT-B (the bench's random weights) with `body` on the 60 layer linears and `head` on the
    output layer (None: leave MKL fp32)."""
    m = random_gpt("GPT-B")
    slots = list(m._linear_slots())
    for parent, name in slots:
        lin = getattr(parent, name)
        maker = head if (parent is m and name == "output") else body
        if maker is not None:
            setattr(parent, name, maker(lin))
    return m


CONFIGS = {
    "fp32-packed": (FP32PackedLinear, FP32PackedLinear),
    "bf16 (BF16Linear)": (BF16Linear, BF16Linear),
    "int8 (Int8Linear, today)": (Int8Linear, Int8Linear),
    "int8, head fp32": (Int8Linear, None),
    "int8, head bf16": (Int8Linear, BF16Linear),
    "int8, head fp32-packed": (Int8Linear, FP32PackedLinear),
    "int8 hi/lo activations": (HiLo, HiLo),
    "emu w8 per-channel, fp32 compute": (lambda l: Emu(l), lambda l: Emu(l)),
    "emu w8 + bf16 act": (lambda l: Emu(l, act="bf16"), lambda l: Emu(l, act="bf16")),
    "emu w8 + bf16 out": (lambda l: Emu(l, out="bf16"), lambda l: Emu(l, out="bf16")),
    "emu w8 + bf16 act + out": (lambda l: Emu(l, act="bf16", out="bf16"), lambda l: Emu(l, act="bf16", out="bf16")),
    "emu w8 g128, fp32 compute": (lambda l: Emu(l, "g128"), lambda l: Emu(l, "g128")),
    "emu w8 g32, fp32 compute": (lambda l: Emu(l, "g32"), lambda l: Emu(l, "g32")),
    "emu bf16 w, fp32 act/out": (lambda l: Emu(l, "bf16"), lambda l: Emu(l, "bf16")),
    "emu fp32 w, bf16 act + out": (lambda l: Emu(l, "none", act="bf16", out="bf16"), lambda l: Emu(l, "none", act="bf16", out="bf16")),
    "emu w8 body only (head fp32)": (lambda l: Emu(l), None),
    "emu w8 head only": (None, lambda l: Emu(l)),
    **{f"noise {eps:.2%} (fp32 compute)": (lambda l, e=eps: Noisy(l, e), lambda l, e=eps: Noisy(l, e))
       for eps in (0.0011, 0.0025, 0.0039, 0.0064, 0.0073)},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--configs", default="", help="';'-separated substrings of configuration names (default all)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    chosen = [c for c in CONFIGS if not args.configs or any(k in c for k in args.configs.split(";"))]
    params = SamplingParams(cfg_scale=2.0)
    cond = torch.arange(args.samples) % 1000
    with torch.no_grad():
        ref = ARSampler(sample=False)(random_gpt("GPT-B"), cond, params=params, num_tokens=args.tokens).tokens
        print(f"GPT-B random weights, {args.samples} samples x {args.tokens} tokens, CFG 2, teacher-forced greedy "
              "agreement with fp32 (MKL)", flush=True)
        for name in chosen:
            model = build(*CONFIGS[name])
            start = time.perf_counter()
            forced = _forced_greedy(model, cond, ref, params)
            print(f"| {name} | {(forced == ref).float().mean().item():.1%} | {int((forced != ref).sum())} of "
                  f"{ref.numel()} differ | {time.perf_counter() - start:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
