"""NFE per image of sampler specs on a shipped pipeline: one untimed pass over N class-balanced
conditions (`argen bench samplers` conditions, seeds 0..N-1, batch 16; samples do not depend on the batch).

    python scripts/sampler_nfe.py default-c2i 32 auto:L=32 pac pac:L=32,K=6,D=4
    python scripts/sampler_nfe.py default-c2i 32 draft:L=6 --drafter runs/drafter/model

Samplers with a draft model (`draft`) also print the drafter's forwards per image (not part of
NFE) and the per-token acceptance rate (accepted / tested drafts).
"""
import argparse
import time

import torch

from argen.bench.samplers import benchmark_conditions
from argen.pipeline import ARPipeline
from argen.samplers import SamplingParams, get_sampler

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("n", type=int)
parser.add_argument("specs", nargs="+")
parser.add_argument("--drafter", default=None, help="draft model instead of the pipeline's own")
args = parser.parse_args()
torch.set_num_threads(1)
pipe = ARPipeline.from_pretrained(args.model, drafter=args.drafter)
conds = benchmark_conditions(pipe, args.n)
params = SamplingParams(cfg_scale=pipe.defaults.get("cfg_scale", 1.0))  # the model's default guidance, as the bench
for spec in args.specs:
    t0 = time.perf_counter()
    sampler = get_sampler(spec)
    out = pipe.sample_tokens(conds, list(range(args.n)), sampler, params, 16)
    nfe = out.nfe_per_sample.float().mean().item()
    line = f"{args.model} {spec}: NFE {nfe:.2f} compression {pipe.generator.num_positions / nfe:.2f}x"
    if out.draft_forwards_per_sample is not None:
        line += f", drafter forwards {out.draft_forwards_per_sample.float().mean().item():.2f}/image"
        if sampler.acceptance is not None:  # (a tree sampler does not count per-draft acceptance)
            line += f", acceptance {sampler.acceptance:.3f}"
    print(f"{line} ({time.perf_counter() - t0:.0f}s)", flush=True)
