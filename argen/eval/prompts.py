"""Prompt accuracy: does a text-to-image model draw the garment a prompt asks for?

Each prompt of a labelled prompt file is sampled `num_images` times and every image is
classified by the shipped Fashion-MNIST classifier; accuracy is the share of images whose
predicted class is the prompt's label, overall and per class. The default prompt file,
`argen/data/prompts_heldout.jsonl` (120 prompts, 12 per class), was written separately from
the training captions: everyday names, plurals, materials, colours, occasions, short and
long. A class-conditional model is scored on the same file by sampling each prompt's label
with the same seeds, which gives the reference a text-to-image model should come close to.

    argen eval prompts --model default-t2i --num-images 4 --json t2i.json
    argen eval prompts --model default-c2i --num-images 4 --json c2i.json
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from argen.errors import ArgenError

#: The held-out prompt set shipped with argen.
HELDOUT_PROMPT_FILE = Path(__file__).resolve().parent.parent / "data" / "prompts_heldout.jsonl"


def load_labelled_prompts(path=None) -> list:
    """`[(prompt, label id)]` from a .jsonl prompt file (default: the held-out set); every prompt needs a label."""
    from argen.eval.sampling import read_prompt_file

    path = Path(path) if path is not None else HELDOUT_PROMPT_FILE
    if path.suffix.lower() != ".jsonl":
        raise ArgenError(f"prompt accuracy needs labelled prompts: a .jsonl file of {{\"prompt\", \"label\"}}, got {path}")
    prompts = read_prompt_file(path)
    unlabelled = [p for p, label in prompts if label is None]
    if unlabelled:
        raise ArgenError(f"{path}: {len(unlabelled)} prompt(s) without a label, e.g. {unlabelled[0]!r}")
    return prompts


@torch.no_grad()
def prompt_accuracy(pipe, prompts: Sequence[tuple], num_images: int = 4, seed: int = 0,
                    cfg_scale: Optional[float] = None, batch_size: int = 64, sampler: str = "ar",
                    classifier=None, progress: bool = False) -> dict:
    """Score `pipe` on labelled `prompts` ([(text, label id)]); image j of prompt i has seed
    `seed + i * num_images + j`. Returns accuracy, per-class and per-prompt results."""
    from argen.data.fashion_mnist import CLASS_NAMES
    from argen.eval.fmnist_classifier import load_fmnist_classifier

    if num_images < 1:
        raise ArgenError(f"--num-images must be >= 1, got {num_images}")
    prompts = list(prompts)
    if not prompts:
        raise ArgenError("no prompts to evaluate")
    if tuple(pipe.class_names) != CLASS_NAMES:
        raise ArgenError("prompt accuracy uses the Fashion-MNIST classifier: the model must draw Fashion-MNIST classes")
    clf = classifier if classifier is not None else load_fmnist_classifier()
    texts = [p for p, _ in prompts]
    labels = torch.tensor([label for _, label in prompts])
    start = time.perf_counter()
    # the pipeline's generation path; image j of prompt i has seed `seed + i * num_images + j`
    if pipe.is_text_to_image:
        conds = pipe.conditions(prompt=texts, num_images=num_images)
    else:  # the class-conditional reference: each prompt's label, same seeds
        conds = pipe.conditions(class_labels=labels.tolist(), num_images=num_images)
    seeds = [seed + i for i in range(len(conds))]
    tokens = pipe.sample_tokens(conds, seeds, sampler, pipe.sampling_params(cfg_scale), batch_size, progress).tokens
    predicted = torch.cat([clf(pipe.tokens_to_images(tokens[i:i + 500], conds[i:i + 500], seeds[i:i + 500]))
                           .argmax(-1).cpu() for i in range(0, len(tokens), 500)]).view(len(prompts), num_images)
    correct = predicted == labels[:, None]
    per_class = {}
    for c, name in enumerate(CLASS_NAMES):
        rows = labels == c
        if rows.any():
            per_class[name] = float(correct[rows].float().mean())
    per_prompt = [{"prompt": t, "label": CLASS_NAMES[int(y)], "correct": int(ok.sum()),
                   "predicted": [CLASS_NAMES[int(p)] for p in pred]}
                  for t, y, ok, pred in zip(texts, labels, correct, predicted)]
    digest = hashlib.sha256(repr([(t, int(y)) for t, y in zip(texts, labels)]).encode()).hexdigest()
    return {"accuracy": float(correct.float().mean()), "per_class": per_class, "per_prompt": per_prompt,
            "num_prompts": len(prompts), "num_images_per_prompt": num_images, "images": int(correct.numel()),
            "seed": seed, "cfg_scale": pipe.defaults.get("cfg_scale", 2.0) if cfg_scale is None else cfg_scale,
            "sampler": sampler, "model_type": "t2i" if pipe.is_text_to_image else "c2i (prompt labels)",
            "prompts_sha256": digest, "seconds": round(time.perf_counter() - start, 1)}


def format_accuracy(result: dict) -> str:
    """A short text table: overall, per class, and the prompts with the fewest correct images."""
    lines = [f"prompt accuracy {100 * result['accuracy']:.1f}% ({result['images']} images: "
             f"{result['num_prompts']} prompts x {result['num_images_per_prompt']}, CFG {result['cfg_scale']}, "
             f"{result['model_type']})"]
    lines += [f"  {name:<12} {100 * acc:5.1f}%" for name, acc in result["per_class"].items()]
    worst = sorted(result["per_prompt"], key=lambda r: r["correct"])[:5]
    n = result["num_images_per_prompt"]
    lines += ["  weakest prompts: " + "; ".join(f"{r['prompt']!r} {r['correct']}/{n}" for r in worst if r["correct"] < n)]
    return "\n".join(lines)
