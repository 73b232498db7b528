"""`argen generate`: text-to-image or class-conditional images from a saved or shipped model.

Every argument is checked before torch is imported: numbers by their argparse types, the model
folder and `--class` from the model's JSON files, the outputs against the user's files. A wrong
value is refused in well under a second.
"""

from __future__ import annotations

from pathlib import Path

from ..checks import MAX_SEED
from ..errors import ArgenError
from .checked import (SEED, add_compile_arg, add_decoding_args, add_drafter_arg, add_sampling_args, add_weights_arg,
                      decoding_args, number)
from .startup import import_libraries

MAX_GRID_PIXELS = 100_000_000  # the grid PNG; 4096 images at the default --grid-scale 4 are ~55 megapixels


def register(sub):
    p = sub.add_parser("generate", help="generate images from a prompt or a class",
                       description="Generate images. A prompt uses the text-to-image model (default-t2i); "
                                   "--class uses the class-conditional one (default-c2i).")
    p.add_argument("prompt", nargs="?", help="text prompt (text-to-image)")
    p.add_argument("--class", dest="classes", action="append", metavar="CLASS",
                   help="class name or id (class-conditional); repeat for several")
    p.add_argument("--model", help="shipped pipeline (default-t2i, default-c2i, shuffle-c2i, titok-c2i, ctf-c2i, "
                                  "flextok-c2i) or a pipeline/model folder")
    p.add_argument("--tokenizer", help="override the model's recorded tokenizer (name or folder)")
    p.add_argument("--num-images", type=number(1, 4096, integer=True), default=16, metavar="N",
                   help="images per class or per prompt, 1..4096 (default 16): "
                        "--class 1 --class 7 --num-images 4 makes 8 images")
    p.add_argument("--seed", type=SEED, default=0,
                   help=f"image i uses seed SEED+i (default 0); seeds are 0..{MAX_SEED}")
    p.add_argument("--out", default="out.png",
                   help="grid PNG (default out.png); the single images go to a folder beside it (out/). "
                        "An existing file or folder there is replaced only if argen wrote it")
    p.add_argument("--sampler", default="ar",
                   help="sampler name or spec with options (default ar), e.g. mcsjd:L=8 or gsd:G=10")
    add_sampling_args(p)
    p.add_argument("--num-tokens", type=number(1, None, integer=True), default=None, metavar="K",
                   help="generate only the first K tokens and decode that prefix (models whose tokenizer "
                        "decodes prefixes, such as flextok-c2i); default: every token")
    p.add_argument("--batch-size", type=number(1, 4096, integer=True), default=16)
    p.add_argument("--grid-scale", type=number(1, 64, integer=True), default=4,
                   help=f"upscale factor of the grid (nearest, default 4); the grid may have at most "
                        f"{MAX_GRID_PIXELS // 1_000_000} megapixels")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    add_weights_arg(p, default="auto")
    add_compile_arg(p)
    add_drafter_arg(p)
    add_decoding_args(p)
    p.set_defaults(func=run)


def image_folder_of(out: Path) -> Path:
    """Where the single images of grid `out` go: `out.png` -> `out/`."""
    return out.with_suffix("")


def check_outputs(text: str) -> tuple:
    """(grid path, image folder), refused in one line unless both can be written without
    replacing anything the user made."""
    from ..atomic import check_output_file, is_argen_folder

    out = check_output_file(text, (".png",), "--out")
    folder = image_folder_of(out)
    where = f"--out {text!r} puts its single images in {str(folder)!r}"
    if folder.exists() and not folder.is_dir():
        raise ArgenError(f"{where}, which is a file; move it away or choose another --out")
    cwd = Path.cwd().resolve()
    if folder.exists() and (folder.resolve() == cwd or folder.resolve() in cwd.parents):
        raise ArgenError(f"{where}, the current folder (or one holding it); choose another --out")
    if folder.is_dir() and any(folder.iterdir()) and not is_argen_folder(folder, "images"):
        raise ArgenError(f"{where}, which holds files argen did not write; move them away or choose another --out")
    return out, folder


def check_model(args) -> tuple:
    """(model name, class ids) from the model's JSON files, before torch is imported."""
    from ..data.classes import resolve_model_class
    from ..hub import inspect_model_dir

    model = args.model if args.model is not None else ("default-t2i" if args.prompt is not None else "default-c2i")
    try:
        found = inspect_model_dir(model)
    except ArgenError as err:
        raise ArgenError(f"--model {model}: {err}") from None
    if args.tokenizer is None and found.meta.get("tokenizer") is None:
        raise ArgenError(f"--model {model}: no tokenizer recorded in {found.folder / 'pipeline.json'}; "
                         f"give one with --tokenizer NAME_OR_FOLDER")
    if found.is_text_to_image and args.classes:
        raise ArgenError(f"--model {model} is a text-to-image model: give a prompt, not --class")
    if not found.is_text_to_image and args.prompt is not None:
        raise ArgenError(f"--model {model} is a class-conditional model: give --class, not a prompt")
    ids = None
    if args.classes:
        num_classes = found.config.get("num_classes", 1000)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ArgenError(f"--model {model}: num_classes in its config.json must be a positive integer")
        ids = [resolve_model_class(c, found.class_names, num_classes) for c in args.classes]
    return model, ids


def run(args) -> int:
    # ---- everything the user gave, checked before torch is imported -----------------------
    if (args.prompt is None) == (not args.classes):
        raise ArgenError("give a prompt (text-to-image) or --class (class-conditional), not both or neither")
    if args.prompt is not None and not args.prompt.strip():
        raise ArgenError("empty prompt: describe the image to generate")
    model, class_ids = check_model(args)
    total = args.num_images * (len(class_ids) if class_ids else 1)
    if args.seed + total - 1 > MAX_SEED:
        raise ArgenError(f"--seed {args.seed}: {total} images use seeds up to {args.seed + total - 1}, past the "
                         f"largest seed {MAX_SEED}; use --seed {MAX_SEED - total + 1} or less")
    out, folder = check_outputs(args.out)

    # ---- heavy part -------------------------------------------------------------------------
    import_libraries()
    from ..atomic import is_argen_file
    from ..checks import check_device
    from ..imageio import make_grid, save_images_folder, save_png_atomic
    from ..samplers import get_sampler

    device = check_device(args.device)
    sampler = get_sampler(args.sampler)
    from ..pipeline import ARPipeline

    pipe = ARPipeline.from_pretrained(model, device=device, tokenizer=args.tokenizer, weights=args.weights,
                                      drafter=args.drafter, decoding=decoding_args(args),
                                      decoder_dtype=args.decoder_dtype)
    pipe.check_num_tokens(args.num_tokens)  # before the prompt is read or anything is sampled
    if args.compile:
        pipe.compile(args.compile)
    # the note reads the prompt as one of the model's classes: an open-vocabulary model (LlamaGen t2i) names none
    if args.prompt is not None and pipe.class_names:
        print_unknown_prompt_note(pipe, args.prompt)
    side = min(pipe.crop or pipe.tokenizer.image_size, pipe.tokenizer.image_size)
    width, height = grid_size(total, side, args.grid_scale)
    if width * height > MAX_GRID_PIXELS:
        raise ArgenError(f"--grid-scale {args.grid_scale}: the grid of {total} images would be {width}x{height} "
                         f"pixels (over {MAX_GRID_PIXELS // 1_000_000} megapixels); lower --grid-scale or --num-images")
    result = pipe(prompt=args.prompt, class_labels=class_ids, num_images=args.num_images, sampler=sampler,
                  cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, cfg_schedule=args.cfg_schedule,
                  temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, progress=True,
                  num_tokens=args.num_tokens)
    names = [f"{i:04d}_seed{s}.png" for i, s in enumerate(result.seeds)]
    grid = make_grid(result.images, scale=args.grid_scale)
    if out.exists() and not is_argen_file(out):  # appeared while sampling
        raise ArgenError(f"--out {str(out)!r} was created by something else while sampling; nothing written")
    for path, write in ((folder, lambda: save_images_folder(result.images, folder, names, kind="images")),
                        (out, lambda: save_png_atomic(grid, out))):
        try:
            write()
        except OSError as err:  # a full disk, a folder made read-only meanwhile: nothing half-written is left
            raise ArgenError(f"cannot write {str(path)!r}: {err.strerror or err}") from None
    n = len(result.images)
    print(f"generated {n} images in {result.seconds:.2f} s ({result.seconds / n:.3f} s/image, "
          f"{result.num_forward_passes} forward passes, sampler {args.sampler}, weights "
          f"{getattr(pipe.generator, 'weight_format', 'fp32')}) -> {out} and {folder}/")
    return 0


def grid_size(n: int, side: int, scale: int, pad: int = 2) -> tuple:
    """(width, height) of `make_grid` for n images of side x side pixels."""
    import math

    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    return columns * (side * scale + pad) + pad, rows * (side * scale + pad) + pad


def print_unknown_prompt_note(pipe, prompt: str) -> None:
    """One line when the prompt names nothing the model was trained on, saying how it was read."""
    reading = pipe.read_prompt(prompt)
    if not reading.known:
        from ..data.fashion_mnist import CLASS_NAMES

        what = "Fashion-MNIST garments" if tuple(pipe.class_names) == CLASS_NAMES else "its training classes"
        print(f"note: this model only knows {what} ({', '.join(pipe.class_names)}); {prompt!r} names none of them, "
              f"so it was read as the nearest one, {reading.class_name} (text similarity {reading.similarity:.2f})")
