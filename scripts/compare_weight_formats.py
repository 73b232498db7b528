"""Does a weight format change any sample? The shipped pipelines in fp32 (MKL, the exact reference)
and in another format, same seeds, token by token.

* every pinned case of `tests/data/reference_tokens.json` (each shipped model, each sampler, batch
  size 3), in fp32 and in the format, and each of them against the pinned record too (the record
  was taken on another machine: fp32 itself may differ from it where its last bits differ);
* N AR images of default-c2i (image i: seed i, class i % 10, the model's CFG) at one batch size;
* the same images in the format at batch size 1 and 5 (the same seed must give the same image
  whatever the batch size).

    python scripts/compare_weight_formats.py --weights fp32-packed --threads 1 --num-images 64

Prints one line per comparison and a summary; exits 1 when the format changed any sample.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

RECORD = Path(__file__).resolve().parents[1] / "tests" / "data" / "reference_tokens.json"


def differing(a: torch.Tensor, b: torch.Tensor) -> str:
    if torch.equal(a, b):
        return "same"
    rows = int((a != b).any(1).sum())
    return f"DIFFER in {rows} of {a.shape[0]} images ({int((a != b).sum())} of {a.numel()} tokens)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="fp32-packed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-images", type=int, default=64, help="AR images of default-c2i (0 = skip)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of the N AR images")
    p.add_argument("--skip-record", action="store_true", help="skip the pinned reference cases")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from argen.pipeline import ARPipeline

    changed = 0
    if not args.skip_record:
        record = json.loads(RECORD.read_text())
        for model, entry in record.items():
            pipes = {fmt: ARPipeline.from_pretrained(model, weights=fmt) for fmt in ("fp32", args.weights)}
            for sampler, expected in entry["samplers"].items():
                out = {fmt: pipe(**entry["case"], sampler=sampler, seed=11, batch_size=3, progress=False).tokens
                       for fmt, pipe in pipes.items()}
                pinned = torch.tensor(expected["tokens"])
                verdict = differing(out[args.weights], out["fp32"])
                changed += verdict != "same"
                print(f"{model} {sampler}: {args.weights} vs fp32 here: {verdict}; fp32 vs record: "
                      f"{differing(out['fp32'], pinned)}; {args.weights} vs record: "
                      f"{differing(out[args.weights], pinned)}", flush=True)
    if args.num_images:
        pipes = {fmt: ARPipeline.from_pretrained("default-c2i", weights=fmt) for fmt in ("fp32", args.weights)}
        labels = [i % 10 for i in range(args.num_images)]

        def draw(pipe, lo, hi, batch):
            # one image per class label, seeds lo..hi-1 (image i: seed i, class i % 10)
            return pipe(class_labels=labels[lo:hi], num_images=1, seed=lo, batch_size=batch, progress=False).tokens

        ref = draw(pipes["fp32"], 0, args.num_images, args.batch_size)
        fmt = draw(pipes[args.weights], 0, args.num_images, args.batch_size)
        verdict = differing(fmt, ref)
        changed += verdict != "same"
        print(f"default-c2i AR, {args.num_images} images at batch {args.batch_size}: {args.weights} vs fp32: {verdict}",
              flush=True)
        k = min(10, args.num_images)
        for batch in (1, 5):
            again = draw(pipes[args.weights], 0, k, batch)
            verdict = differing(again, fmt[:k])
            changed += verdict != "same"
            print(f"default-c2i AR, first {k} images, {args.weights} at batch {batch} vs batch {args.batch_size}: "
                  f"{verdict}", flush=True)
    print(f"\n{args.weights}: {'no sample changed' if not changed else f'{changed} comparisons differ'}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
