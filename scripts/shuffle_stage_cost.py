"""How much of a Token-Shuffle model's sampling time its residual MLP blocks cost: images/s of
default-c2i and of the shuffle model with its shuffle / unshuffle stages cut to the first n blocks per
side (and, with `n:H`, those blocks replaced by SwiGLU blocks H wide; `n:H:plain`, by plain blocks,
x + W2 silu(W1 x)), side by side in one process (AR, decoding to images included, interleaved rounds).

Timing only: a cut or thinned model is not a trained model (its images are not meaningful), but a
decode step costs the same whatever the weights, so this measures the wall-clock ceiling a retrained
lighter stage could reach.

    python scripts/shuffle_stage_cost.py --blocks 2,1,0 --batch-sizes 1,16 --rounds 4
    python scripts/shuffle_stage_cost.py --blocks 1:256,1:128,1:64,0 --rounds 5
    python scripts/shuffle_stage_cost.py --blocks 1,1:128:plain,0 --batch-sizes 1 --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import torch
import torch.nn as nn

from argen.bench.decode import interleave
from argen.models.token_shuffle import MLP_KINDS
from argen.pipeline import ARPipeline


def cut(pipe: ARPipeline, blocks: int, hidden: Optional[int] = None, kind: str = "swiglu") -> ARPipeline:
    g = pipe.generator
    for side in ("shuffle_mlp", "unshuffle_mlp"):
        kept = list(getattr(g, side))[:blocks]
        if hidden:  # fresh blocks of that width and kind (timing only: their weights are untrained)
            kept = [MLP_KINDS[kind](g.gpt_config, hidden).eval() for _ in kept]
        setattr(g, side, nn.ModuleList(kept))
    return pipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="default-c2i")
    p.add_argument("--model", default="shuffle-c2i")
    p.add_argument("--blocks", default="2,1,0",
                   help="residual MLP blocks kept per side, each as N, N:H (blocks H wide instead) or N:H:plain")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4, help="the first round is a warm-up and is dropped")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    pipes = {args.baseline: ARPipeline.from_pretrained(args.baseline)}
    for spec in args.blocks.split(","):
        n, hidden, kind = (spec.split(":") + ["", ""])[:3]
        width = f", {kind or 'swiglu'} {hidden} wide" if hidden else ""
        pipes[f"{args.model}, {n} block(s) per side{width}"] = cut(ARPipeline.from_pretrained(args.model), int(n),
                                                                   int(hidden) if hidden else None, kind or "swiglu")
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
