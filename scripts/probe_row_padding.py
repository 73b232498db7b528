"""Row padding of the oneDNN-packed formats (`PackedLinear.min_rows`): decode steps of MKL fp32 and
of fp32-packed (or bf16, `--format bf16`) with each padding, same weights, interleaved in one
process; medians and fastest tenths.

    python scripts/probe_row_padding.py --model GPT-B --batch-sizes 1 --pads 0,2,4
    python scripts/probe_row_padding.py --model default-c2i --batch-sizes 1,16 --pads 0,4 --steps 30
    python scripts/probe_row_padding.py --model dim=512,n_layer=4,n_head=8,vocab_size=4096 --pads 4
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="GPT-B", help="an official GPT size or GPTConfig fields k=v,k=v (random "
                   "weights), or a pipeline name/folder")
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="decode steps per variant and round")
    p.add_argument("--pads", default="0,4", help="min_rows values to compare (0 = no padding)")
    p.add_argument("--format", default="fp32-packed", choices=("fp32-packed", "bf16"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from argen.bench.decode import _decode_steps, interleave, random_gpt
    from argen.bench.load import CpuLoad
    from argen.models import GPT, GPTConfig
    from argen.pipeline import ARPipeline
    from argen.samplers import SamplingParams

    def make(fmt):
        if args.model in GPTConfig.NAMED_SIZES:
            return random_gpt(args.model, weights=fmt)
        if "=" in args.model:  # a GPT of any shape, random weights drawn as random_gpt draws them
            fields = {k: int(v) for k, v in (item.split("=") for item in args.model.split(","))}
            torch.manual_seed(0)
            model = GPT(GPTConfig(**{"num_classes": 1000, "block_size": 256, **fields}))
            torch.nn.init.normal_(model.output.weight, std=0.02)
            return model.eval().set_weight_format(fmt)
        return ARPipeline.from_pretrained(args.model, weights=fmt).generator.eval()

    models = {"fp32": make("fp32")}
    nbytes = sum(m.weight.numel() * 4 for m in models["fp32"].decode_linears())
    for pad in [int(x) for x in args.pads.split(",")]:
        model = make(args.format)
        for linear in model.decode_linears():
            linear.min_rows = pad  # an instance attribute shadows the class default
        models[f"{args.format} min_rows={pad}"] = model
    params = SamplingParams(cfg_scale=2.0)
    tasks = {}
    with torch.no_grad():
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            for label, model in models.items():
                cond = torch.arange(bs) % model.num_classes
                _decode_steps(model, cond, params, 3)  # warm-up
                tasks[(label, bs)] = (lambda m=model, c=cond: _decode_steps(m, c, params, args.steps))
        with CpuLoad() as load:
            samples = interleave(tasks, args.rounds)
    print(f"{args.model} ({nbytes / 2**20:.0f} MiB of fp32 decode-step weights), CFG 2, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps, interleaved")
    print("| variant | batch (rows) | median ms/step | fastest 10% ms | vs fp32 (median) | vs fp32 (fastest 10%) |")
    print("|---|---|---|---|---|---|")
    for (label, bs), times in samples.items():
        med, p10 = statistics.median(times), sorted(times)[len(times) // 10]
        ref = samples[("fp32", bs)]
        print(f"| {label} | {bs} ({2 * bs}) | {med * 1e3:.2f} | {p10 * 1e3:.2f} | {statistics.median(ref) / med:.2f}x "
              f"faster | {sorted(ref)[len(ref) // 10] / p10:.2f}x faster |")
    if load.report:
        print(f"other processes used {load.report.other_cores:.2f} of {load.report.cpus} cores")


if __name__ == "__main__":
    main()
