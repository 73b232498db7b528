"""Text side only: can a prompt's class be read off the training captions it is nearest to?

Each prompt's MiniLM sentence embedding is compared with those of the training captions
(the rich pool and the basic captions); the prompt's class is the majority among its 15 most
similar captions. This is the ceiling a generator conditioned on the sentence embedding could
reach if it followed its nearest training captions; it needs no generator and runs in minutes.

    python scripts/caption_knn.py --per-group 1000 argen/data/prompts_heldout.jsonl
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="+", help="labelled .jsonl prompt files")
    parser.add_argument("--per-group", type=int, default=1000, help="rich captions per (class, shade)")
    parser.add_argument("--k", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from argen.data import captions
    from argen.eval.prompts import load_labelled_prompts
    from argen.text import load_text_encoder

    encoder = load_text_encoder("minilm", max_length=64, pooling="mean")

    def embed(texts):
        return torch.cat([encoder.sentence_embeddings(texts[i:i + 512]) for i in range(0, len(texts), 512)])

    pool = captions.rich_caption_pool(args.per_group)
    rich = [(t, label) for (label, _), group in pool.items() for t in group]
    basic = [(t, label) for label in range(10) for t in captions.all_train_captions(label)]
    banks = {name: (embed([t for t, _ in rows]), torch.tensor([label for _, label in rows]))
             for name, rows in (("rich", rich), ("basic", basic))}
    for path in args.prompts:
        prompts = load_labelled_prompts(path)
        queries = embed([p for p, _ in prompts])
        truth = torch.tensor([label for _, label in prompts])
        for name, (bank, labels) in banks.items():
            nearest = labels[(queries @ bank.T).topk(args.k, dim=1).indices]
            predicted = torch.mode(nearest, dim=1).values
            print(f"{path}: {name} captions ({len(bank)}): {args.k}-NN accuracy "
                  f"{100 * (predicted == truth).float().mean():.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
