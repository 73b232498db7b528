"""Split an `argen eval prompts --json` result by whether a prompt uses a garment name of the
training captions.

The held-out prompts share no prompt string and no frame with the training captions, but many
use garment names the rich captions also use ("chinos", "parka"). This reports accuracy on
the prompts that use none of those names separately, so the figure for wording the model never
saw is visible on its own.

    python scripts/prompt_vocabulary_split.py t2i.json
"""

from __future__ import annotations

import json
import re
import sys


def training_names() -> set:
    from argen.data import captions

    names = {n for syns in captions.TRAIN_SYNONYMS.values() for n in syns}
    names |= {n for nouns in captions.RICH_NOUNS.values() for pair in nouns for n in pair}
    return {n.removeprefix("pair of ") for n in names}


def uses_training_name(prompt: str, names: set) -> bool:
    text = f" {prompt.lower()} "
    return any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text) for n in names)


def main(path: str) -> int:
    result = json.loads(open(path).read())
    names = training_names()
    n = result["num_images_per_prompt"]
    groups = {True: [], False: []}
    for row in result["per_prompt"]:
        groups[uses_training_name(row["prompt"], names)].append(row)
    for seen, rows in ((True, groups[True]), (False, groups[False])):
        if rows:
            acc = sum(r["correct"] for r in rows) / (n * len(rows))
            label = "use a training garment name" if seen else "use no training garment name"
            print(f"{len(rows):3d} prompts {label}: {100 * acc:.1f}%")
    print("  unseen-name prompts: " + "; ".join(f"{r['prompt']!r} {r['correct']}/{n}" for r in groups[False]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
