"""`argen generate`: text-to-image or class-conditional images from a saved or shipped model."""

from __future__ import annotations

import sys

from ..errors import ArgenError
from .checked import add_weights_arg


def register(sub):
    p = sub.add_parser("generate", help="generate images from a prompt or a class",
                       description="Generate images. A prompt uses the text-to-image model (default-t2i); "
                                   "--class uses the class-conditional one (default-c2i).")
    p.add_argument("prompt", nargs="?", help="text prompt (text-to-image)")
    p.add_argument("--class", dest="classes", action="append", metavar="CLASS",
                   help="class name or id (class-conditional); repeat for several")
    p.add_argument("--model", help="shipped model name (default-t2i, default-c2i) or a pipeline/model folder")
    p.add_argument("--tokenizer", help="override the model's recorded tokenizer (name or folder)")
    p.add_argument("--num-images", type=int, default=16, help="images per prompt/class (default 16)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    p.add_argument("--out", default="out.png", help="grid PNG; the single images go to a folder beside it")
    p.add_argument("--sampler", default="ar",
                   help="sampler name or spec with options (default ar), e.g. mcsjd:L=8 or gsd:G=10")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance (default: the model's)")
    p.add_argument("--cfg-interval", type=int, default=-1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grid-scale", type=int, default=4, help="upscale factor of the grid (nearest, default 4)")
    p.add_argument("--device", default="cpu")
    add_weights_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..imageio import check_png_path, make_grid, save_images_folder, save_png_atomic
    from ..pipeline import ARPipeline

    if (args.prompt is None) == (not args.classes):
        raise ArgenError("give a prompt (text-to-image) or --class (class-conditional), not both or neither")
    if args.prompt is not None and not args.prompt.strip():
        raise ArgenError("empty prompt: describe the image to generate")
    if args.num_images < 1 or args.num_images > 4096:
        raise ArgenError(f"--num-images must be in 1..4096, got {args.num_images}")
    if args.grid_scale < 1:
        raise ArgenError("--grid-scale must be >= 1")
    out = check_png_path(args.out)
    model = args.model or ("default-t2i" if args.prompt is not None else "default-c2i")
    pipe = ARPipeline.from_pretrained(model, device=args.device, tokenizer=args.tokenizer, weights=args.weights)
    result = pipe(prompt=args.prompt, class_labels=args.classes, num_images=args.num_images, sampler=args.sampler,
                  cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                  progress=sys.stderr.isatty())
    names = [f"{i:04d}_seed{s}.png" for i, s in enumerate(result.seeds)]
    folder = out.with_suffix("")
    save_images_folder(result.images, folder, names)
    save_png_atomic(make_grid(result.images, scale=args.grid_scale), out)
    n = len(result.images)
    print(f"generated {n} images in {result.seconds:.2f} s ({result.seconds / n:.3f} s/image, "
          f"{result.num_forward_passes} forward passes, sampler {args.sampler}) -> {out} and {folder}/")
    return 0
