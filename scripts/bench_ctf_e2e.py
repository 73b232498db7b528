"""End-to-end images/s of pipelines side by side (sampling + refiner pass + tokenizer decode).

`argen bench samplers` times the generator's sampling only; a coarse-to-fine pipeline also pays
its refiner's one pass, so this times the whole `ARPipeline.__call__`, the models interleaved
round by round in one process (a busy machine slows them alike), medians of the rounds.

    python scripts/bench_ctf_e2e.py --models default-c2i ctf-c2i --batch-sizes 1,16 --num-images 16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["default-c2i", "ctf-c2i"])
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--num-images", type=int, default=16, help="images per timed round (classes cycle)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sampler", default="ar")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from argen.pipeline import ARPipeline

    pipes = {m: ARPipeline.from_pretrained(m) for m in args.models}
    for pipe in pipes.values():  # fp32 compute, as argen generate does on a CPU
        pipe.generator.float()
        if pipe.refiner is not None:
            pipe.refiner.float()
    labels = [i % 10 for i in range(args.num_images)]
    records = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        times = {m: [] for m in pipes}
        for m, pipe in pipes.items():  # warm-up
            pipe(class_labels=labels[:bs], sampler=args.sampler, batch_size=bs, progress=False)
        for _ in range(args.rounds):
            for m, pipe in pipes.items():
                start = time.perf_counter()
                pipe(class_labels=labels, sampler=args.sampler, batch_size=bs, progress=False)
                times[m].append(time.perf_counter() - start)
        for m in pipes:
            med = statistics.median(times[m])
            rec = {"model": m, "batch_size": bs, "images": args.num_images, "median_s": round(med, 3),
                   "images_per_s": round(args.num_images / med, 2), "rounds_s": [round(t, 3) for t in times[m]]}
            records.append(rec)
            print(json.dumps(rec))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
