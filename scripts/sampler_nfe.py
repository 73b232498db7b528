"""NFE per image of sampler specs on a shipped pipeline: one untimed pass over N class-balanced
conditions (`argen bench samplers` conditions, seeds 0..N-1, batch 16; samples do not depend on the batch).

    python scripts/sampler_nfe.py default-c2i 32 auto:L=32 pac pac:L=32,K=6,D=4
"""
import sys, time, torch
from argen.pipeline import ARPipeline
from argen.samplers import SamplingParams, get_sampler
from argen.bench.samplers import benchmark_conditions
torch.set_num_threads(1)
model, n, specs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
pipe = ARPipeline.from_pretrained(model)
conds = benchmark_conditions(pipe, n)
params = SamplingParams(cfg_scale=pipe.defaults.get("cfg_scale", 1.0))  # the model's default guidance, as the bench
for spec in specs:
    t0 = time.perf_counter()
    out = pipe.sample_tokens(conds, list(range(n)), get_sampler(spec), params, 16)
    nfe = out.nfe_per_sample.float().mean().item()
    print(f"{model} {spec}: NFE {nfe:.2f} compression {pipe.generator.num_positions / nfe:.2f}x ({time.perf_counter() - t0:.0f}s)", flush=True)
