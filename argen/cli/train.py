"""`argen train tokenizer` and `argen train gpt`.

Both run through `accelerate.Accelerator`, so `accelerate launch -m argen.cli.main train ...`
spreads them over several GPUs or machines unchanged (`--batch-size` is per process).
"""

from __future__ import annotations

import shlex
import sys

from ..errors import ArgenError
from .checked import SEED, number

COUNT = number(1, integer=True)  # steps, batch sizes, intervals


def _int_tuple(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ArgenError(f"expected comma-separated integers such as 1,2,2, got {text!r}") from None
    if not values:
        raise ArgenError("expected at least one integer")
    return values


def _command_line() -> str:
    """The command as typed, for model cards (`python -m argen ...`, `argen ...` or a script)."""
    if not sys.argv:
        return "argen train"
    prog = sys.argv[0].replace("\\", "/")
    if prog.endswith("argen/__main__.py") or prog.endswith("argen/cli/main.py") or prog.endswith("-m"):
        head = "python -m argen"
    elif prog.endswith("/argen") or prog == "argen":
        head = "argen"
    else:
        head = "python " + shlex.quote(prog)
    return head + " " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _common(parser, default_lr: float, default_batch: int, default_ckpt: int = 500):
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=COUNT, help="optimizer steps")
    length.add_argument("--epochs", type=number(0, lo_open=True), help="epochs over the training set (converted to steps)")
    parser.add_argument("--out", required=True, help="run folder: checkpoints/, log.csv, metrics.json, model/")
    parser.add_argument("--batch-size", type=COUNT, default=default_batch, help="batch per process")
    parser.add_argument("--lr", type=number(0, lo_open=True), default=default_lr, help="peak learning rate (warmup + cosine)")
    parser.add_argument("--warmup-steps", type=number(0, integer=True), default=200)
    parser.add_argument("--weight-decay", type=number(0), default=0.05)
    parser.add_argument("--ema-decay", type=number(0, 1, hi_open=True), default=0.999)
    parser.add_argument("--grad-clip", type=number(0), default=1.0)
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (refused when --out holds no training run; a run "
                             "folder with no checkpoint yet starts again at step 0, with a notice)")
    parser.add_argument("--ckpt-every", type=COUNT, default=default_ckpt, help="checkpoint every N steps (last 2 kept)")
    parser.add_argument("--log-every", type=COUNT, default=25, help="append a row to log.csv every N steps")
    parser.add_argument("--threads", type=number(1, 4096, integer=True), default=None, help="CPU threads for torch")
    parser.add_argument("--limit", type=number(2, integer=True), default=None, help="use only the first N training images (tests)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.add_argument("--export-dtype", choices=["auto", "float16", "float32"], default="auto",
                        help="dtype of the exported EMA weights (auto: float16 unless it costs quality)")


def register(sub):
    parser = sub.add_parser("train", help="train a VQ tokenizer or a GPT generator on Fashion-MNIST")
    kinds = parser.add_subparsers(dest="train_kind", metavar="KIND", parser_class=type(parser))
    parser.set_defaults(func=lambda args: parser.print_help() or 0)

    tok = kinds.add_parser("tokenizer", help="train a VQ tokenizer")
    _common(tok, default_lr=5e-4, default_batch=32)
    tok.add_argument("--ch", type=COUNT, default=32, help="base channel width")
    tok.add_argument("--ch-mult", type=_int_tuple, default=(1, 1, 2), help="width multipliers per level, e.g. 1,1,2")
    tok.add_argument("--num-res-blocks", type=COUNT, default=1)
    tok.add_argument("--z-channels", type=COUNT, default=64)
    tok.add_argument("--codebook-size", type=number(2, integer=True), default=1024)
    tok.add_argument("--codebook-dim", type=COUNT, default=8)
    tok.add_argument("--norm-groups", type=COUNT, default=None, help="GroupNorm groups (default: divides every width)")
    tok.add_argument("--l1-weight", type=number(0), default=0.0, help="extra L1 reconstruction loss weight")
    tok.add_argument("--restart-every", type=number(0, integer=True), default=100, help="dead-code restart interval (0: off)")
    tok.add_argument("--restart-until", type=number(0, 1), default=0.8, help="no restarts after this fraction of the run")
    tok.add_argument("--test-limit", type=number(2, integer=True), default=None, help="evaluate on the first N test images only")
    tok.set_defaults(func=_run_tokenizer)

    gpt = kinds.add_parser("gpt", help="train a class- (c2i) or text-conditional (t2i) GPT on VQ codes")
    _common(gpt, default_lr=1e-3, default_batch=64)
    gpt.add_argument("--model-type", choices=["c2i", "t2i"], required=True)
    gpt.add_argument("--vq", required=True, help="trained VQ tokenizer folder or shipped name (default-vq)")
    gpt.add_argument("--size", default=None, help="official size name (GPT-B, ...) instead of --dim/--n-layer/--n-head")
    gpt.add_argument("--dim", type=COUNT, default=320)
    gpt.add_argument("--n-layer", type=COUNT, default=6)
    gpt.add_argument("--n-head", type=COUNT, default=5)
    gpt.add_argument("--dropout", type=number(0, 1, hi_open=True), default=0.0, help="token/residual/FFN dropout (LlamaGen: 0.1)")
    gpt.add_argument("--class-dropout", type=number(0, 1, hi_open=True), default=0.1, help="condition dropout for CFG")
    gpt.add_argument("--flip", action="store_true", help="also train on horizontally flipped images")
    gpt.add_argument("--codes-cache", default=None, help="where to cache the encoded training set "
                                                        "(default <out>/codes_train.safetensors)")
    gpt.add_argument("--text-encoder", default="minilm", help="t2i caption encoder")
    gpt.add_argument("--tokenizer-name", default=None, help="tokenizer name recorded in pipeline.json "
                                                           "(default: --vq)")
    gpt.add_argument("--cfg-scale", type=number(0), default=2.0, help="CFG scale of the model card's sample grid")
    gpt.add_argument("--shuffle", type=COUNT, default=None, metavar="S",
                     help="Token-Shuffle: one position per SxS window of codes (S must divide the code grid)")
    gpt.set_defaults(func=_run_gpt)


def _common_kwargs(args) -> dict:
    return dict(out=args.out, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, ema_decay=args.ema_decay,
                grad_clip=args.grad_clip, seed=args.seed, resume=args.resume, ckpt_every=args.ckpt_every,
                log_every=args.log_every, threads=args.threads, limit=args.limit, progress=not args.no_progress,
                export_dtype=args.export_dtype, command=_command_line())


def _check_outputs(args) -> None:
    """`--out` (and `--codes-cache`) before the training code is even imported (no torch yet)."""
    from ..train.rundir import check_codes_cache, check_run_dir

    check_run_dir(args.out, args.resume)
    check_codes_cache(getattr(args, "codes_cache", None))


def _run_tokenizer(args) -> int:
    _check_outputs(args)
    from ..train.tokenizer import train_tokenizer

    metrics = train_tokenizer(**_common_kwargs(args), ch=args.ch, ch_mult=args.ch_mult,
                              num_res_blocks=args.num_res_blocks, z_channels=args.z_channels,
                              codebook_size=args.codebook_size, codebook_dim=args.codebook_dim,
                              norm_groups=args.norm_groups, l1_weight=args.l1_weight,
                              restart_every=args.restart_every, restart_until=args.restart_until,
                              test_limit=args.test_limit)
    if metrics:
        test = metrics["test"]
        print(f"tokenizer: {args.out}/model  test PSNR {test['psnr_db']:.2f} dB  "
              f"codebook usage {100 * test['codebook_usage']:.1f}%  ({metrics['export_dtype']})")
    return 0


def _run_gpt(args) -> int:
    _check_outputs(args)
    from ..train.gpt import train_gpt

    metrics = train_gpt(**_common_kwargs(args), model_type=args.model_type, vq=args.vq, size=args.size,
                        dim=args.dim, n_layer=args.n_layer, n_head=args.n_head, dropout=args.dropout,
                        class_dropout=args.class_dropout, flip=args.flip, codes_cache=args.codes_cache,
                        text_encoder=args.text_encoder, tokenizer_name=args.tokenizer_name,
                        cfg_scale=args.cfg_scale, shuffle=args.shuffle)
    if metrics:
        print(f"gpt ({args.model_type}): {args.out}/model  final loss {metrics['final_train_losses'].get('loss', float('nan')):.4f}"
              f"  ({metrics['export_dtype']})")
    return 0
