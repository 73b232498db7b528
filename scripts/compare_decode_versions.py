"""Today's generator against an earlier argen's, same weights, decode steps interleaved in one process.

The earlier tree is imported as another package name (a copy of its `argen/` folder renamed, e.g.
`git archive <commit> argen | tar -x -C /tmp/old && mv /tmp/old/argen /tmp/old/argen_old`, with its
absolute `argen.` imports renamed to `argen_old.`), so both run side by side on the same load:

    PYTHONPATH=.:/tmp/old python scripts/compare_decode_versions.py --model default-c2i --batch-sizes 1,16

Reports the median and the fastest tenth of the per-step times of each, and whether the two give
bit-identical logits (they must: the op cuts of issue 12 may not change a sample).
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
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from argen.bench.load import CpuLoad
    from argen.pipeline import ARPipeline

    new = ARPipeline.from_pretrained(args.model).generator.eval()
    old_models = importlib.import_module(f"{args.old_package}.models")
    old = old_models.GPT(old_models.GPTConfig.from_dict(dict(new.config))).eval() \
        if hasattr(old_models, "GPTConfig") else None
    old.load_state_dict(new.state_dict())
    n = new.num_positions - 1
    times = {}
    with torch.no_grad(), CpuLoad() as load:
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            cond = torch.arange(bs) % new.num_classes
            _, a = steps(new, cond, n)
            _, b = steps(old, cond, n)
            same = torch.equal(a, b)
            for r in range(args.rounds):
                order = [("today", new), ("before", old)] if r % 2 == 0 else [("before", old), ("today", new)]
                for name, m in order:
                    times.setdefault((name, bs), []).extend(steps(m, cond, n)[0])
            print(f"batch {bs}: logits bit-identical: {same}")
    print(f"\n| version | batch | median ms/step | fastest 10% ms/step |\n|---|---|---|---|")
    for (name, bs), ts in times.items():
        ts = sorted(ts)
        print(f"| {name} | {bs} | {statistics.median(ts) * 1e3:.2f} | {ts[len(ts) // 10] * 1e3:.2f} |")
    for bs in sorted({k[1] for k in times}):
        a, b = sorted(times[("today", bs)]), sorted(times[("before", bs)])
        print(f"batch {bs}: before / today = {statistics.median(b) / statistics.median(a):.2f}x (medians), "
              f"{b[len(b) // 10] / a[len(a) // 10]:.2f}x (fastest tenth)")
    if load.report:
        print(f"other processes used {load.report.other_cores:.2f} of {load.report.cpus} cores on average")


if __name__ == "__main__":
    main()
