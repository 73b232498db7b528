"""Where a GPT-B decode step (batch 1 with CFG = 2 rows, random weights) spends its time beyond the
weight reads, and whether torch.compile removes it: eager MKL fp32, eager fp32-packed, compiled fp32,
and compiled fp32 with inductor's weight freezing (inductor then prepacks the constant weights for
oneDNN itself), interleaved in one process; medians and fastest tenths. `--profile` prints the
per-op table of eager fp32-packed steps instead.

    python scripts/probe_compile_levers.py --rounds 3
    python scripts/probe_compile_levers.py --profile
"""

from __future__ import annotations

import argparse
import statistics

import torch

from argen.bench.decode import _decode_steps, interleave, random_gpt
from argen.samplers import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="GPT-B")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="decode steps per variant and round (first 5 dropped)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params, cond = SamplingParams(cfg_scale=2.0), torch.tensor([3])

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        model = random_gpt(args.size, weights="fp32-packed")
        with torch.no_grad():
            _decode_steps(model, cond, params, 5)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                _decode_steps(model, cond, params, args.steps)
        print(f"{args.steps} steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        return

    import torch._inductor.config as inductor_config
    models = {"fp32": random_gpt(args.size), "fp32-packed": random_gpt(args.size, weights="fp32-packed"),
              "fp32 + compile": random_gpt(args.size).compile_decode()}
    with torch.no_grad():
        _decode_steps(models["fp32 + compile"], cond, params, 2)  # compiled before freezing is switched on
        inductor_config.freezing = True
        frozen = random_gpt(args.size)
        frozen.requires_grad_(False)
        models["fp32 + compile + freezing"] = frozen.compile_decode()
        _decode_steps(frozen, cond, params, 2)
        times = interleave({k: (lambda m=m: _decode_steps(m, cond, params, args.steps)[5:]) for k, m in models.items()},
                           args.rounds)
    print("| variant | median ms / step | fastest 10% |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1000 * statistics.median(t):.2f} | {1000 * sorted(t)[len(t) // 10]:.2f} |")


if __name__ == "__main__":
    main()
