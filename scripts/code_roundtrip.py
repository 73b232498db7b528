"""Code self-consistency of a generator's samples: decode the sampled code grid, re-encode the
image with the same tokenizer, and count the codes that come back unchanged. Codes of real images
(test split, encoded once) give the tokenizer's own rate; a generator whose sampled neighbours do
not fit together (an incoherent grid, e.g. the s x s codes of a Token-Shuffle window drawn
independently) produces images the encoder reads as other codes, so its rate falls below that.

    python scripts/code_roundtrip.py default-c2i shuffle-c2i --num-images 300 --json roundtrip.json

AR samples at each pipeline's default CFG (or --cfg-scale), class i % 10 and seed i for image i (as `argen eval fid`).
Reported per model: the fraction of codes unchanged for the samples and for N real test images,
and the fraction of Token-Shuffle-sized windows (2 x 2 codes) whose codes all come back.
"""
import argparse

import torch

from argen.atomic import atomic_write_json
from argen.data.fashion_mnist import load_fashion_mnist, pad_image, to_model_range
from argen.pipeline import ARPipeline


def agreement(tokenizer, codes: torch.Tensor, batch: int = 100) -> dict:
    """codes [N, h*w] -> fraction of codes and of 2x2 windows unchanged by decode + re-encode."""
    h, w = tokenizer.grid
    same = []
    for lo in range(0, len(codes), batch):
        part = codes[lo:lo + batch]
        again = tokenizer.encode(tokenizer.decode(part).float().clamp(-1, 1)).flatten(1)
        same.append(again == part)
    same = torch.cat(same).reshape(-1, h, w)
    windows = same.reshape(-1, h // 2, 2, w // 2, 2).all(4).all(2)
    return {"codes_unchanged": float(same.float().mean()), "windows_2x2_unchanged": float(windows.float().mean())}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance for every model (default: each pipeline's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    test_images, _ = load_fashion_mnist("test")
    result = {}
    for name in args.models:
        pipe = ARPipeline.from_pretrained(name)
        n = args.num_images
        params = pipe.sampling_params(args.cfg_scale)
        conds = pipe.conditions(class_labels=[i % 10 for i in range(n)])
        tokens = pipe.sample_tokens(conds, list(range(n)), "ar", params, batch_size=50).tokens
        sampled = pipe.generator.tokens_to_codes(tokens)
        real = pad_image(to_model_range(test_images[:n]).unsqueeze(1), pipe.tokenizer.image_size)
        real_codes = pipe.tokenizer.encode(real).flatten(1)
        result[name] = {"samples": agreement(pipe.tokenizer, sampled), "real": agreement(pipe.tokenizer, real_codes),
                        "grid": list(pipe.tokenizer.grid), "num_images": n,
                        "cfg_scale": params.cfg_scale}
        print(name, result[name], flush=True)
    if args.json:
        atomic_write_json(args.json, result, indent=1)


if __name__ == "__main__":
    main()
