"""Record the tokens and images the shipped pipelines produce for fixed seeds, for every sampler.

`tests/test_reference_tokens.py` compares against this record, so a refactor that changes any
sample of a shipped model fails. Re-record only when a shipped model's weights change on purpose:

    python scripts/record_reference_tokens.py [--only default-t2i]

A new sampler is added to the record without touching the others' entries:

    python scripts/record_reference_tokens.py --add pac

Float32 rounding differs between CPUs (MKL and oneDNN pick other kernels for other instruction
sets), and on rare seeds a last-bit difference flips one accept/reject decision of a speculative
sampler, after which the sample is another one, equally valid. On a new kind of CPU, with no
change of code or weights, record this machine's samples beside the others:

    python scripts/record_reference_tokens.py --this-cpu

Each differing case gains an alternative tagged with this CPU's model name; nothing is replaced.

When a tokenizer's decoding changes on purpose and the tokens do not, re-hash every recorded sample's
images, alternatives included, from its recorded tokens (the test then checks the new decoding):

    python scripts/record_reference_tokens.py --images
"""

import argparse
import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from argen.atomic import atomic_write_text
from argen.pipeline import ARPipeline, to_pil

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "reference_tokens.json"
SAMPLERS = ("ar", "sjd:L=8", "mcsjd:L=16", "gsd:G=10,L=8", "sjd:L=8,init=above", "auto", "pac", "spatial:w=2")
CASES = {
    "default-c2i": {"class_labels": [0, 5, 7, 9], "num_images": 2},
    "default-t2i": {"prompt": ["a sneaker", "a leather handbag"], "num_images": 2},
}


def record(model: str, samplers=SAMPLERS, weights: str = "fp32") -> dict:
    pipe = ARPipeline.from_pretrained(model, weights=weights)
    out = {}
    for sampler in samplers:
        result = pipe(**CASES[model], sampler=sampler, seed=11, batch_size=3, progress=False)
        out[sampler] = {"tokens": result.tokens.tolist(), "images_sha256": pixels_sha256(result.images)}
    return out


def pixels_sha256(images) -> str:
    """The record's hash of a sample's PIL images (what `tests/test_reference_tokens.py` compares)."""
    return hashlib.sha256(np.stack([np.asarray(im) for im in images]).tobytes()).hexdigest()


def images_sha256(pipe, model: str, tokens: list) -> str:
    """The hash `record` gives a sample's images, from its recorded tokens (image i decoded with seed 11 + i)."""
    conds = pipe.conditions(CASES[model].get("prompt"), CASES[model].get("class_labels"), CASES[model]["num_images"])
    seeds = [11 + i for i in range(len(conds))]
    return pixels_sha256(to_pil(pipe.tokens_to_images(torch.tensor(tokens), conds, seeds)))


def rehash_images(data: dict) -> None:
    for model, entry in data.items():
        pipe = ARPipeline.from_pretrained(model)
        for sampler, expected in entry["samplers"].items():
            for sample in [expected] + expected.get("alternatives", []):
                new = images_sha256(pipe, model, sample["tokens"])
                if new != sample["images_sha256"]:
                    print(f"{model} {sampler}{' (' + sample['cpu'] + ')' if 'cpu' in sample else ''}: images re-hashed")
                sample["images_sha256"] = new


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def add_this_cpu(data: dict, weights: str = "fp32") -> int:
    """Add this machine's samples as alternatives where they differ from every recorded one."""
    added = 0
    for model, entry in data.items():
        for sampler, sample in record(model, list(entry["samplers"]), weights).items():
            expected = entry["samplers"][sampler]
            known = [expected] + expected.get("alternatives", [])
            if any(k["tokens"] == sample["tokens"] and k["images_sha256"] == sample["images_sha256"] for k in known):
                continue
            expected.setdefault("alternatives", []).append({**sample, "cpu": cpu_name()})
            added += 1
            print(f"{model} {sampler}: this CPU's sample added as an alternative")
    return added


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CASES))
    parser.add_argument("--add", action="append", default=[], metavar="SPEC",
                        help="record only this sampler spec, keeping every other entry as it is")
    parser.add_argument("--this-cpu", action="store_true",
                        help="keep the record; add this CPU's samples where they differ (same code, same weights)")
    parser.add_argument("--images", action="store_true",
                        help="keep every recorded token; re-hash each sample's images from them (a decoder changed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    if args.images:
        rehash_images(data)
    elif args.this_cpu:  # the test runs at torch's default thread count and with both fp32 kernels
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            for weights in ("fp32", "fp32-packed"):
                add_this_cpu(data, weights)
    else:
        for model in [args.only] if args.only else CASES:
            if args.add:
                data[model]["samplers"].update(record(model, args.add))
            else:
                data[model] = {"case": CASES[model], "samplers": record(model)}
    atomic_write_text(OUT, json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
