"""FlexTok per-k table (issue 16): reconstruction, generation and speed against default-c2i, in one run.

For every prefix length k and every decoder setting (`--flow-steps`: Euler steps, or
"steps:guidance[:dtype]" for register guidance and a bf16 decoder network):
  * reconstruction: the first N test images encoded, their first k codes decoded (image i from seed i):
    PSNR on the 28x28 garment area, reconstruction FID and classifier accuracy (`evaluate_tokenizer`,
    the function of `argen eval tokenizer --num-tokens k`), against the baseline's tokenizer (default-vq);
  * generation: N class-balanced images (seeds 0..N-1, each model's default CFG, AR): FID and class
    accuracy in the fmnist classifier's features (`quality_scorer`, as `argen bench samplers --fid`).
    With per-image seeds, AR's first k tokens are the same whether it samples k or K tokens (tested in
    tests/test_flextok.py; checked again here on a few images), so the K-token samples are drawn once and
    each k decodes their prefixes;
  * cost: generator forward passes per image (measured) and decoder passes per image (flow steps, x2
    with register guidance), and wall-clock images/s with the decoder counted, every setting and the
    baseline timed in the same interleaved rounds in this process (sampling and decoding timed apart,
    so the table shows where the time goes). With a bf16 setting the baseline is also timed with its
    tokenizer in bf16 (an extra row), so the decoder dtype is compared like for like.
Reconstruction rows are measured for fp32 settings only (bf16 is a speed option of decoding).

Writes a JSON record (--json), a Markdown table (--md) and one plot (--plot).

    python scripts/flextok_table.py --model flextok-c2i --baseline default-c2i --ks 1,2,4,8,16,32 \\
        --flow-steps 8,25 --num 1000 --batch-sizes 1,16 --time-images 16 --rounds 2 --threads 1 \\
        --json docs/results/flextok-table.json --md docs/results/flextok-table.md --plot docs/results/flextok-table.png
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from argen.atomic import atomic_write_json, atomic_write_text, sign_json
from argen.data.fashion_mnist import load_fashion_mnist
from argen.eval.quality import quality_scorer
from argen.pipeline import DECODER_DTYPES, ARPipeline
from argen.samplers import get_sampler
from argen.bench.samplers import benchmark_conditions
from argen.train.tokenizer import evaluate_tokenizer


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def ints(text: str) -> list:
    return [int(v) for v in text.split(",") if v]


def decode_all(pipe, tokens, conds, seeds, batch: int = 100) -> torch.Tensor:
    return torch.cat([pipe.tokens_to_images(tokens[i:i + batch], conds[i:i + batch], seeds[i:i + batch])
                      for i in range(0, len(seeds), batch)])


def decoder_settings(text: str, guidance: float) -> list:
    """"8,4:2,8:1:bf16" -> [(label, steps, guidance, dtype)]; a plain number keeps `guidance`, fp32."""
    out = []
    for part in text.split(","):
        bits = part.split(":")
        if not part or len(bits) > 3 or (len(bits) == 3 and bits[2] not in DECODER_DTYPES):
            raise SystemExit(f"--flow-steps: bad entry {part!r} (steps[:guidance[:fp32|bf16]])")
        out.append((part, int(bits[0]), float(bits[1]) if len(bits) > 1 else guidance,
                    bits[2] if len(bits) > 2 else "fp32"))
    return out


def in_dtype(pipe, tokenizers: dict, dtype: str):
    """`pipe` with its tokenizer swapped for the copy in `dtype` (made once, kept in `tokenizers`)."""
    if dtype not in tokenizers:
        tokenizers[dtype] = torch.nn.Module.to(copy.deepcopy(tokenizers["fp32"]), DECODER_DTYPES[dtype])
    pipe.tokenizer = tokenizers[dtype]
    return pipe


def timed(pipe, conds, seeds, batch_size: int, num_tokens=None) -> tuple:
    """(seconds sampling, seconds decoding, generator forwards per image) for all images, in batches."""
    sampler = get_sampler("ar")
    t0 = time.perf_counter()
    out = pipe.sample_tokens(conds, seeds, sampler, pipe.sampling_params(), batch_size, num_tokens=num_tokens)
    t1 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(seeds), batch_size):
            pipe.tokens_to_images(out.tokens[i:i + batch_size], conds[i:i + batch_size], seeds[i:i + batch_size])
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, float(out.nfe_per_sample.float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="FlexTok pipeline (flextok-c2i or a folder)")
    p.add_argument("--baseline", default="default-c2i")
    p.add_argument("--ks", default="1,2,4,8,16,32")
    p.add_argument("--flow-steps", default="8,25",
                   help="decoder settings to measure, comma-separated: Euler steps, or steps:guidance[:fp32|bf16]")
    p.add_argument("--guidance", type=float, default=None, help="decoder register guidance (default: the model's)")
    p.add_argument("--num", type=int, default=1000, help="N for reconstruction and generation metrics")
    p.add_argument("--batch-sizes", default="1,16", help="batch sizes of the timing")
    p.add_argument("--time-images", type=int, default=16, help="images per timed setting and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", default="", help="parts to skip: recon,gen,time")
    p.add_argument("--json", required=True)
    p.add_argument("--md", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks, skip = ints(args.ks), set(args.skip.split(","))
    pipe = ARPipeline.from_pretrained(args.model)
    base = ARPipeline.from_pretrained(args.baseline)
    tok = pipe.tokenizer
    if not getattr(tok, "accepts_prefixes", False):
        raise SystemExit(f"{args.model}: its tokenizer does not decode prefixes")
    guidance = tok.decode_guidance if args.guidance is None else args.guidance
    default_steps, default_guidance = tok.decode_steps, tok.decode_guidance
    settings_list = decoder_settings(args.flow_steps, guidance)
    toks, base_toks = {"fp32": tok}, {"fp32": base.tokenizer}

    def use(label):  # the pipeline decoding as setting `label` says
        _, s, g, dtype = next(x for x in settings_list if x[0] == label)
        decoder = in_dtype(pipe, toks, dtype).tokenizer.set_decoding(steps=s, guidance_scale=g)
        return decoder.decoder_passes
    record = {"command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]) if argv is None else str(argv),
              "model": args.model, "baseline": args.baseline, "ks": ks, "flow_steps": [x[0] for x in settings_list],
              "decoder_guidance": guidance, "num": args.num, "threads": args.threads,
              "load_average_start": list(__import__("os").getloadavg())}
    started = time.time()

    # ---- reconstruction ------------------------------------------------------------------------
    if "recon" not in skip:
        images, labels = load_fashion_mnist("test")
        images, labels = images[:args.num], labels[:args.num]
        rec = {"baseline": evaluate_tokenizer(base.tokenizer, images, labels=labels, rfid=True)}
        log(f"recon baseline: rFID {rec['baseline']['rfid']:.2f} PSNR {rec['baseline']['psnr_db']:.2f}")
        for s, _, _, dtype in settings_list:
            if dtype != "fp32":
                continue
            use(s)
            for k in ks:
                m = evaluate_tokenizer(tok, images, labels=labels, rfid=True, num_tokens=k)
                rec[f"s{s}_k{k}"] = m
                log(f"recon steps {s} k {k}: rFID {m['rfid']:.2f} PSNR {m['psnr_db']:.2f} "
                    f"acc {m['recon_class_accuracy']:.3f}")
        record["reconstruction"] = rec
        record["reconstruction_protocol"] = (f"first {args.num} Fashion-MNIST test images; PSNR on the 28x28 area; "
                                             "rFID in fmnist-classifier features vs fashion-mnist:test")

    # ---- generation ----------------------------------------------------------------------------
    if "gen" not in skip:
        score = quality_scorer(args.num, floor=False, log=log)
        seeds = list(range(args.num))
        gen = {}
        conds = benchmark_conditions(base, args.num)
        t0 = time.time()
        out = base.sample_tokens(conds, seeds, "ar", base.sampling_params(), batch_size=50)
        imgs = decode_all(base, out.tokens, conds, seeds)
        m = score(imgs, conds.labels)
        gen["baseline"] = {"fid": m["fid"], "class_accuracy": m["class_accuracy"],
                           "nfe_per_image": float(out.nfe_per_sample.float().mean()),
                           "cfg_scale": base.defaults.get("cfg_scale"), "seconds": round(time.time() - t0, 1)}
        log(f"gen baseline: FID {m['fid']:.2f} acc {m['class_accuracy']:.3f}")
        conds = benchmark_conditions(pipe, args.num)
        t0 = time.time()
        full = pipe.sample_tokens(conds, seeds, "ar", pipe.sampling_params(), batch_size=50)
        gen["flextok_sampling_seconds"] = round(time.time() - t0, 1)
        # the prefix property the reuse relies on, checked on the first images
        few = conds[:8]
        for k in ks:
            part = pipe.sample_tokens(few, seeds[:8], "ar", pipe.sampling_params(), batch_size=8, num_tokens=k)
            if not torch.equal(part.tokens, full.tokens[:8, :k]):
                raise SystemExit(f"AR with num_tokens={k} is not the prefix of the full samples")
        for s, *_ in settings_list:
            passes = use(s)
            for k in ks:
                t0 = time.time()
                imgs = decode_all(pipe, full.tokens[:, :k], conds, seeds)
                m = score(imgs, conds.labels)
                gen[f"s{s}_k{k}"] = {"fid": m["fid"], "class_accuracy": m["class_accuracy"], "nfe_per_image": k,
                                     "decoder_passes_per_image": passes,
                                     "decode_seconds": round(time.time() - t0, 1)}
                log(f"gen steps {s} k {k}: FID {m['fid']:.2f} acc {m['class_accuracy']:.3f}")
        gen["cfg_scale"] = pipe.defaults.get("cfg_scale")
        record["generation"] = gen

    # ---- timing --------------------------------------------------------------------------------
    if "time" not in skip:
        timing = {}
        conds_b = benchmark_conditions(base, args.time_images)
        conds_f = benchmark_conditions(pipe, args.time_images)
        seeds = list(range(args.time_images))
        settings = [("baseline", None, "fp32")] + [("baseline", None, d) for d in
                                                   sorted({x[3] for x in settings_list} - {"fp32"})]
        settings += [("flextok", k, s) for s, *_ in settings_list for k in ks]
        for bs in ints(args.batch_sizes):
            runs = {}
            for r in range(args.rounds + 1):  # round 0 warms up
                for name, k, s in settings:
                    if name == "baseline":
                        res = timed(in_dtype(base, base_toks, s), conds_b, seeds, bs)
                    else:
                        use(s)
                        res = timed(pipe, conds_f, seeds, bs, num_tokens=k)
                    if r:
                        runs.setdefault((name, k, s), []).append(res)
                log(f"timing batch {bs} round {r} done")
            base_total = statistics.median(a + b for a, b, _ in runs[("baseline", None, "fp32")])
            for (name, k, s), values in runs.items():
                sample_s = statistics.median(a for a, _, _ in values)
                decode_s = statistics.median(b for _, b, _ in values)
                total = statistics.median(a + b for a, b, _ in values)
                key = ("baseline" if s == "fp32" else f"baseline-{s}") if name == "baseline" else f"s{s}_k{k}"
                timing.setdefault(key, {})[f"batch{bs}"] = {
                    "images_per_second": args.time_images / total, "sample_seconds_per_image": sample_s / args.time_images,
                    "decode_seconds_per_image": decode_s / args.time_images, "decode_share": decode_s / (sample_s + decode_s),
                    "speedup_vs_baseline": base_total / total, "nfe_per_image": values[0][2],
                    "rounds_seconds": [round(a + b, 3) for a, b, _ in values]}
        record["timing"] = timing
        record["timing_protocol"] = (f"{args.time_images} images per setting and round, {args.rounds} timed rounds after "
                                     "a warm-up, all settings interleaved in one process; medians; AR; decode included")
    in_dtype(pipe, toks, "fp32").tokenizer.set_decoding(steps=default_steps, guidance_scale=default_guidance)
    in_dtype(base, base_toks, "fp32")
    record["load_average_end"] = list(__import__("os").getloadavg())
    record["wall_seconds"] = round(time.time() - started, 1)
    atomic_write_json(args.json, sign_json(record))
    table = markdown(record)
    print(table)
    if args.md:
        atomic_write_text(args.md, table)
    if args.plot:
        plot(record, args.plot)
    return 0


def markdown(record: dict) -> str:
    rec, gen, timing = record.get("reconstruction", {}), record.get("generation", {}), record.get("timing", {})
    batch_keys = sorted({b for t in timing.values() for b in t}, key=lambda b: int(b[5:]))
    head = ["setting", "k", "decoder (steps[:guidance:dtype])", "PSNR (dB)", "rFID", "gen FID", "class acc.", "GPT fwd / image",
            "decoder passes / image"]
    for b in batch_keys:
        head += [f"{b}: images/s", f"{b}: vs baseline", f"{b}: decode share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    def row(label, k, s, key):
        r, g, t = rec.get(key, {}), gen.get(key, {}), timing.get(key, {})
        cells = [label, str(k), str(s), fmt(r.get("psnr_db"), ".2f"), fmt(r.get("rfid"), ".2f"), fmt(g.get("fid"), ".2f"),
                 fmt(None if g.get("class_accuracy") is None else 100 * g["class_accuracy"], ".1f"),
                 fmt(g.get("nfe_per_image", (t.get(batch_keys[0]) or {}).get("nfe_per_image") if batch_keys else None), ".0f"),
                 fmt(g.get("decoder_passes_per_image"), "d") if not key.startswith("baseline") else "1 (VQ conv)"]
        for b in batch_keys:
            tb = t.get(b, {})
            cells += [fmt(tb.get("images_per_second"), ".1f"), fmt(tb.get("speedup_vs_baseline"), ".2f") + "x"
                      if tb else "–", fmt(None if not tb else 100 * tb["decode_share"], ".0f") + "%" if tb else "–"]
        return "| " + " | ".join(cells) + " |"

    lines.append(row(f"{record['baseline']} (default-vq)", 64, "–", "baseline"))
    if "baseline-bf16" in timing:
        lines.append(row(f"{record['baseline']} (default-vq in bf16)", 64, "–", "baseline-bf16"))
    for s in record["flow_steps"]:
        for k in record["ks"]:
            lines.append(row(record["model"], k, s, f"s{s}_k{k}"))
    return "\n".join(lines) + "\n"


def plot(record: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec, gen, timing = record.get("reconstruction", {}), record.get("generation", {}), record.get("timing", {})
    ks = record["ks"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in record["flow_steps"]:
        if f"s{s}_k{ks[0]}" in rec:
            ax1.plot(ks, [rec[f"s{s}_k{k}"]["rfid"] for k in ks], "o--", label=f"FlexTok rFID, {s} steps")
        if gen:
            ax1.plot(ks, [gen[f"s{s}_k{k}"]["fid"] for k in ks], "s-", label=f"flextok-c2i gen FID, {s} steps")
    if rec:
        ax1.axhline(rec["baseline"]["rfid"], color="gray", ls="--", label="default-vq rFID (64 codes)")
    if gen:
        ax1.axhline(gen["baseline"]["fid"], color="black", ls="-", label="default-c2i gen FID")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("tokens k")
    ax1.set_ylabel(f"FID (fmnist features, N = {record['num']})")
    ax1.legend(fontsize=7)
    batch_keys = sorted({b for t in timing.values() for b in t}, key=lambda b: int(b[5:]))
    for b in batch_keys:
        for s in record["flow_steps"]:
            ax2.plot(ks, [timing[f"s{s}_k{k}"][b]["images_per_second"] for k in ks], "o-",
                     label=f"flextok-c2i {b}, {s} steps")
        ax2.axhline(timing["baseline"][b]["images_per_second"], ls="--", color="gray")
        ax2.text(ks[0], timing["baseline"][b]["images_per_second"], f"default-c2i {b}", fontsize=7, va="bottom")
    if batch_keys:
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("tokens k")
        ax2.set_ylabel("images / s (AR, decoder included)")
        ax2.legend(fontsize=7)
    fig.suptitle("FlexTok on Fashion-MNIST: quality and speed per prefix length k")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
