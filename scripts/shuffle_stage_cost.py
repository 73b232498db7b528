"""How much of shuffle-c2i's sampling time its residual MLP blocks cost: images/s of default-c2i and
of shuffle-c2i with its shuffle / unshuffle stages cut to the first n blocks per side, side by side
in one process (AR, decoding to images included, interleaved rounds).

Timing only: a cut model is not a trained model (its images are not meaningful), but a decode step
costs the same whatever the weights, so this measures the wall-clock ceiling a retrained lighter
stage could reach.

    python scripts/shuffle_stage_cost.py --blocks 2,1,0 --batch-sizes 1,16 --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from argen.bench.decode import interleave
from argen.pipeline import ARPipeline


def cut(pipe: ARPipeline, blocks: int) -> ARPipeline:
    g = pipe.generator
    g.shuffle_mlp = nn.ModuleList(list(g.shuffle_mlp)[:blocks])
    g.unshuffle_mlp = nn.ModuleList(list(g.unshuffle_mlp)[:blocks])
    return pipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="default-c2i")
    p.add_argument("--model", default="shuffle-c2i")
    p.add_argument("--blocks", default="2,1,0", help="residual MLP blocks kept per side")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4, help="the first round is a warm-up and is dropped")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    pipes = {args.baseline: ARPipeline.from_pretrained(args.baseline)}
    for n in (int(b) for b in args.blocks.split(",")):
        pipes[f"{args.model}, {n} block(s) per side"] = cut(ARPipeline.from_pretrained(args.model), n)
    labels = [i % 10 for i in range(args.num_images)]

    print(f"| model | batch | images / s | vs {args.baseline} |\n|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        def timer(pipe):
            def once():
                start = time.perf_counter()
                pipe(class_labels=labels, num_images=1, batch_size=batch, seed=0, progress=False)
                return [args.num_images / (time.perf_counter() - start)]
            return once
        rates = interleave({name: timer(pipe) for name, pipe in pipes.items()}, args.rounds)
        base = statistics.median(rates[args.baseline][1:])
        for name, r in rates.items():
            m = statistics.median(r[1:])
            print(f"| {name} | {batch} | {m:.2f} | {m / base:.2f}× |")


if __name__ == "__main__":
    main()
