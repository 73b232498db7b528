"""Today's generator against an earlier argen's, same weights, decode steps interleaved in one process.

The earlier tree is imported as another package name (a copy of its `argen/` folder renamed, e.g.
`git archive <commit> argen | tar -x -C /tmp/old && mv /tmp/old/argen /tmp/old/argen_old`, with its
absolute `argen.` imports renamed to `argen_old.`), so both run side by side on the same load:

    PYTHONPATH=.:/tmp/old python scripts/compare_decode_versions.py --model default-c2i --batch-sizes 1,16

`--variants` times several settings of today's generator against the earlier one in the same rounds: a
weight format, or a format and a `--compile` mode joined by "+" ("fp32+max-autotune", "bf16+compile" for the
default mode). Reports the median and the fastest tenth of the per-step times of each, and whether eager fp32
gives the earlier tree's logits to the bit (issue 12's op cuts kept them; later changes that move them on
purpose, such as session 24's row padding, are recorded in docs/history/decode.md).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch


def steps(model, cond, n, cfg=True):
    both = torch.cat([cond, model.null_condition(cond)]) if cfg else cond
    cache = model.new_cache(both.shape[0])
    model.prefill(both, cache)
    tok = torch.zeros(both.shape[0], 1, dtype=torch.long)
    out, logits = [], None
    for i in range(n):
        s = time.perf_counter()
        logits = model.decode(tok, torch.tensor([1 + i]), cache)
        tok = logits[:, -1:].argmax(-1)
        out.append(time.perf_counter() - s)
    return out, logits


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default-c2i")
    p.add_argument("--old-package", default="argen_old")
    p.add_argument("--variants", default="fp32", help="comma-separated FORMAT or FORMAT+MODE (default fp32)")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from argen.bench.load import CpuLoad
    from argen.models.base import COMPILE_MODES
    from argen.models.quant import WEIGHT_FORMATS
    from argen.pipeline import ARPipeline

    def today(variant):
        fmt, _, mode = variant.partition("+")
        if fmt not in WEIGHT_FORMATS:
            p.error(f"unknown weight format in {variant!r}; choose among {', '.join(WEIGHT_FORMATS)}")
        model = ARPipeline.from_pretrained(args.model, weights=fmt).generator.eval()
        if mode:
            mode = "default" if mode == "compile" else mode
            if mode not in COMPILE_MODES:
                p.error(f"unknown compile mode in {variant!r}; choose among compile, {', '.join(COMPILE_MODES[1:])}")
            model.compile_decode(mode)
        return model

    models = {variant: today(variant) for variant in args.variants.split(",")}
    reference = ARPipeline.from_pretrained(args.model).generator.eval()
    old_models = importlib.import_module(f"{args.old_package}.models")
    old = old_models.GPT(old_models.GPTConfig.from_dict(dict(reference.config))).eval()
    old.load_state_dict(reference.state_dict())
    models["before"] = old
    n = reference.num_positions - 1
    times = {}
    with torch.no_grad(), CpuLoad() as load:
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            cond = torch.arange(bs) % reference.num_classes
            same = torch.equal(steps(reference, cond, n)[1], steps(old, cond, n)[1])
            for model in models.values():  # compiles, and warms every setting once
                steps(model, cond, n)
            names = list(models)
            for r in range(args.rounds):  # the order rotates, so no setting always runs first
                for name in names[r % len(names):] + names[:r % len(names)]:
                    times.setdefault((name, bs), []).extend(steps(models[name], cond, n)[0])
            print(f"batch {bs}: eager fp32 logits bit-identical to the earlier tree's: {same}")
    print("\n| version | batch | median ms/step | fastest 10% ms/step | before / this (medians) |\n|---|---|---|---|---|")
    for (name, bs), ts in times.items():
        ts, before = sorted(ts), statistics.median(times[("before", bs)])
        print(f"| {name} | {bs} | {statistics.median(ts) * 1e3:.3f} | {ts[len(ts) // 10] * 1e3:.3f} | "
              f"{before / statistics.median(ts):.2f}x |")
    if load.report:
        print(f"other processes used {load.report.other_cores:.2f} of {load.report.cpus} cores on average")


if __name__ == "__main__":
    main()
