"""Record the tokens and images the shipped pipelines produce for fixed seeds, for every sampler.

`tests/test_reference_tokens.py` compares against this record, so a refactor that changes any
sample of a shipped model fails. Re-record only when a shipped model's weights change on purpose:

    python scripts/record_reference_tokens.py [--only default-t2i]

A new sampler is added to the record without touching the others' entries:

    python scripts/record_reference_tokens.py --add pac
"""

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from argen.pipeline import ARPipeline

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "reference_tokens.json"
SAMPLERS = ("ar", "sjd:L=8", "mcsjd:L=16", "gsd:G=10,L=8", "sjd:L=8,init=above", "auto", "pac", "spatial:w=2")
CASES = {
    "default-c2i": {"class_labels": [0, 5, 7, 9], "num_images": 2},
    "default-t2i": {"prompt": ["a sneaker", "a leather handbag"], "num_images": 2},
}


def record(model: str, samplers=SAMPLERS) -> dict:
    pipe = ARPipeline.from_pretrained(model)
    out = {}
    for sampler in samplers:
        result = pipe(**CASES[model], sampler=sampler, seed=11, batch_size=3, progress=False)
        pixels = np.stack([np.asarray(im) for im in result.images])
        out[sampler] = {"tokens": result.tokens.tolist(), "images_sha256": hashlib.sha256(pixels.tobytes()).hexdigest()}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CASES))
    parser.add_argument("--add", action="append", default=[], metavar="SPEC",
                        help="record only this sampler spec, keeping every other entry as it is")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for model in [args.only] if args.only else CASES:
        if args.add:
            data[model]["samplers"].update(record(model, args.add))
        else:
            data[model] = {"case": CASES[model], "samplers": record(model)}
    OUT.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
