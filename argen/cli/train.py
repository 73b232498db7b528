"""`argen train tokenizer` and `argen train gpt`.

Both run through `accelerate.Accelerator`, so `accelerate launch -m argen.cli.main train ...`
spreads them over several GPUs or machines unchanged (`--batch-size` is per process).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ..errors import ArgenError
from .checked import NESTED_DROPOUT_MODES, SEED, number
from .startup import import_libraries

COUNT = number(1, integer=True)  # steps, batch sizes, intervals


def _int_tuple(text: str) -> tuple:
    """A `type=` for comma-separated positive integers (--ch-mult, --fsq-levels); argparse names the flag
    (an ArgumentTypeError: a ValueError would be reported as "invalid _int_tuple value")."""
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,2, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    if min(values) < 1:  # a zero or negative width reached torch as a traceback
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
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


# Architecture-specific options: default None so a flag given to the other architecture is refused.
_VQ_ONLY = {
    "--ch": dict(type=COUNT, help="base channel width (default 32)"),
    "--ch-mult": dict(type=_int_tuple, help="width multipliers per level, e.g. 1,1,2 (default)"),
    "--num-res-blocks": dict(type=COUNT, help="(default 1)"),
    "--z-channels": dict(type=COUNT, help="(default 64)"),
    "--norm-groups": dict(type=COUNT, help="GroupNorm groups (default: divides every width)"),
}
_TITOK_ONLY = {
    "--num-latent-tokens": dict(type=COUNT, help="K, 1D tokens per image (default 16; flextok: registers, 32)"),
    "--patch-size": dict(type=COUNT, help="ViT patch size on the 32x32 frame (default 4: an 8x8 grid)"),
    "--width": dict(type=COUNT, help="encoder and decoder ViT width (default 96; flextok 128)"),
    "--enc-layers": dict(type=COUNT, help="encoder blocks (default 3; flextok 4)"),
    "--dec-layers": dict(type=COUNT, help="decoder blocks (default 4)"),
    "--heads": dict(type=COUNT, help="attention heads (default 4)"),
}
_FLEXTOK_ONLY = {
    "--fsq-levels": dict(type=_int_tuple, help="FSQ levels per dimension, each >= 3 (default 8,5,5,5: 1000 codes)"),
    "--flow-steps": dict(type=COUNT, help="decoding default: Euler steps of the flow decoder (default 8)"),
    "--decoder-guidance": dict(type=number(0, 100), help="decoding default: register guidance scale of the flow decoder "
                                                     "(default 1: off; the run's own evaluation uses it)"),
    "--cfg-dropout": dict(type=number(0, 1, hi_open=True), help="fraction of training images decoded with every "
                                                                  "register masked, for guidance (default 0.1)"),
    "--nested-dropout": dict(choices=NESTED_DROPOUT_MODES,
                             help="how many registers to keep: a power of two, uniformly (pow2, the default) or "
                                  "weighted to long prefixes (pow2-long: P(2^i) proportional to i + 1), or any k "
                                  "in 1..K, uniformly (uniform) or with P(k) proportional to k (uniform-long)"),
    "--nested-full-share": dict(type=number(0, 1), help="share of training images that keep all K registers, drawn "
                                                        "before the null condition (default 0: only the mode's own "
                                                        "draw; uniform keeps K on 1/K)"),
    "--fsq-saturation-weight": dict(type=number(0), help="weight of mean(relu(|z| - 2)^2) on the latents before "
                                                          "FSQ's tanh, keeping them where the codes can still move "
                                                          "(default 0)"),
    "--time-mean": dict(type=number(-5, 5), help="flow training times sigma = sigmoid(N(mean, 1)); > 0 trains more "
                                                  "at high noise, where only the tokens inform (default 0, FlexTok's)"),
}
# The options each architecture takes; the TiTok sizes also size FlexTok.
_ARCH_OPTIONS = {"vq": _VQ_ONLY, "titok": _TITOK_ONLY, "flextok": {**_TITOK_ONLY, **_FLEXTOK_ONLY}}


def _arch_options(args) -> dict:
    """The options given for the chosen architecture (train_tokenizer fills in the rest); a flag of
    another architecture is a one-line error."""
    own = _ARCH_OPTIONS[args.arch]
    every = {**_VQ_ONLY, **_TITOK_ONLY, **_FLEXTOK_ONLY}
    given = [flag for flag in every if flag not in own and getattr(args, flag[2:].replace("-", "_")) is not None]
    if args.arch == "flextok":
        given += [flag for flag in ("--codebook-size", "--codebook-dim")
                  if getattr(args, flag[2:].replace("-", "_")) is not None]
    if given:
        raise ArgenError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --arch {args.arch}")
    names = [flag[2:].replace("-", "_") for flag in own]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def register(sub):
    parser = sub.add_parser("train", help="train a tokenizer (VQ, TiTok or FlexTok), a GPT generator or a CTF refiner "
                                          "on Fashion-MNIST")
    kinds = parser.add_subparsers(dest="train_kind", metavar="KIND", parser_class=type(parser))
    parser.set_defaults(func=lambda args: parser.print_help() or 0)

    tok = kinds.add_parser("tokenizer", help="train a tokenizer: LlamaGen VQ (default), TiTok (--arch titok) or "
                                             "FlexTok (--arch flextok)")
    _common(tok, default_lr=5e-4, default_batch=32)
    tok.add_argument("--arch", choices=["vq", "titok", "flextok"], default="vq",
                     help="vq: LlamaGen VQ, 2D grid of codes; titok: TiTok, K 1D tokens (RGB head, single stage); "
                          "flextok: 1..K ordered 1D tokens, FSQ, rectified-flow decoder")
    vq = tok.add_argument_group("--arch vq")
    for flag, kw in _VQ_ONLY.items():
        vq.add_argument(flag, default=None, **kw)
    ti = tok.add_argument_group("--arch titok and flextok")
    for flag, kw in _TITOK_ONLY.items():
        ti.add_argument(flag, default=None, **kw)
    fl = tok.add_argument_group("--arch flextok")
    for flag, kw in _FLEXTOK_ONLY.items():
        fl.add_argument(flag, default=None, **kw)
    tok.add_argument("--codebook-size", type=number(2, integer=True), default=None, help="vq/titok (default 1024)")
    tok.add_argument("--codebook-dim", type=COUNT, default=None, help="vq/titok code vector size (TiTok's "
                                                                        "token_size; default 8)")
    tok.add_argument("--init-from", default=None, metavar="TOKENIZER",
                     help="start from this tokenizer's weights (shipped name or folder; same architecture, "
                          "except that a FlexTok decoder may grow: more --dec-layers, the new blocks starting "
                          "as the identity)")
    tok.add_argument("--l1-weight", type=number(0), default=0.0, help="extra L1 reconstruction loss weight")
    tok.add_argument("--gan-weight", type=number(0), default=0.0,
                     help="add a PatchGAN hinge loss (discriminator trained from scratch) on the reconstructions "
                          "(flextok: on the stored decoding's last step), its generator term scaled by VQGAN's "
                          "adaptive weight times this (default 0: off)")
    tok.add_argument("--gan-start", type=number(0, integer=True), default=None,
                     help="step at which the discriminator and the adversarial term start (default 0)")
    tok.add_argument("--train-decoder-only", action="store_true",
                     help="freeze encoder and codebook (the codes stay the same; restarts off), train the decoder: "
                          "fine-tuning an --init-from tokenizer (required), as TiTok's stage 2")
    tok.add_argument("--restart-every", type=number(0, integer=True), default=100, help="dead-code restart interval (0: off)")
    tok.add_argument("--restart-until", type=number(0, 1), default=0.8, help="no restarts after this fraction of the run")
    tok.add_argument("--test-limit", type=number(2, integer=True), default=None, help="evaluate on the first N test images only")
    tok.add_argument("--rfid", action="store_true", help="also measure the reconstruction FID of the exported weights "
                                                         "(Fashion-MNIST-classifier features, test split)")
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
    gpt.add_argument("--text-pooling", choices=["tokens", "mean"], default="tokens",
                     help="t2i condition: one slot per token (LlamaGen) or one sentence-embedding slot")
    gpt.add_argument("--text-max-length", type=COUNT, default=None, help="t2i: tokens the encoder reads "
                                                                       "(default: the encoder's)")
    gpt.add_argument("--captions", choices=["basic", "rich"], default="basic",
                     help="t2i training captions: the basic templates or the rich pool (argen.data.captions)")
    gpt.add_argument("--init-from", default=None, metavar="MODEL",
                     help="start from this generator's weights (shipped name or folder); from a c2i model into "
                          "a --text-pooling mean t2i model the caption projection is fitted to its class embeddings")
    gpt.add_argument("--tokenizer-name", default=None, help="tokenizer name recorded in pipeline.json "
                                                           "(default: --vq)")
    gpt.add_argument("--cfg-scale", type=number(0), default=2.0, help="CFG scale of the model card's sample grid")
    gpt.add_argument("--refiner", default=None, help="coarse-to-fine stage 1: train on the cluster ids of this CTF "
                                                    "refiner folder (`argen train refiner`); the export names it")
    gpt.add_argument("--coarse-clusters", type=number(2, integer=True), default=None,
                     help="coarse-to-fine stage 1 with K k-means clusters, before the refiner exists (it must exist "
                          "to export: rerun with --resume)")
    gpt.add_argument("--kmeans-seed", type=SEED, default=0, help="k-means seed with --coarse-clusters")
    gpt.add_argument("--shuffle", type=COUNT, default=None, metavar="S",
                     help="Token-Shuffle: one position per SxS window of codes (S must divide the code grid)")
    gpt.add_argument("--shuffle-blocks", type=number(0, integer=True), default=None, metavar="N",
                     help="with --shuffle: residual MLP blocks on each side of the transformer (default 2)")
    gpt.add_argument("--shuffle-hidden", type=COUNT, default=None, metavar="H",
                     help="with --shuffle: hidden width of those blocks (default: the transformer's FFN width)")
    gpt.add_argument("--shuffle-mlp", choices=("swiglu", "plain"), default=None,
                     help="with --shuffle: each block x + SwiGLU(RMSNorm(x)) (default) or x + W2 silu(W1 x)")
    gpt.add_argument("--distill-from", default=None, metavar="MODEL",
                     help="train a draft model: KL to this generator's guided next-token distribution instead of "
                          "cross-entropy (pipeline folder or shipped name, same codes)")
    gpt.add_argument("--distill-cfg", type=number(0), default=None, metavar="S",
                     help="guidance scale of the distilled distribution (default: the teacher's pipeline default)")
    gpt.set_defaults(func=_run_gpt)

    ref = kinds.add_parser("refiner", help="train a coarse-to-fine (CTF) refiner: k-means clusters of a VQ codebook, "
                                           "fine codes from coarse labels in one pass")
    _common(ref, default_lr=1e-3, default_batch=64)
    ref.add_argument("--vq", required=True, help="trained VQ tokenizer folder or shipped name (default-vq)")
    ref.add_argument("--clusters", type=number(2, integer=True), default=64, help="K, the coarse vocabulary")
    ref.add_argument("--kmeans-seed", type=SEED, default=0)
    ref.add_argument("--normalize", action="store_true", help="L2-normalise code vectors before k-means")
    ref.add_argument("--dim", type=COUNT, default=256)
    ref.add_argument("--n-layer", type=COUNT, default=4)
    ref.add_argument("--n-head", type=COUNT, default=4)
    ref.add_argument("--dropout", type=number(0, 1, hi_open=True), default=0.0)
    ref.add_argument("--class-dropout", type=number(0, 1, hi_open=True), default=0.0,
                     help="share of training items whose class is replaced by the null class, so the refiner can "
                          "be guided (`guidance` in its config.json; default 0: no null class)")
    ref.add_argument("--temperature", type=number(0), default=1.0, help="sampling temperature stored in the refiner")
    ref.add_argument("--no-restrict", action="store_true", help="sample fine codes from the whole codebook, not "
                                                                 "only the coarse label's cluster")
    ref.add_argument("--flip", action="store_true", help="also train on horizontally flipped images")
    ref.add_argument("--codes-cache", default=None, help="where to cache the encoded training set")
    ref.set_defaults(func=_run_refiner)


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
    options = _arch_options(args)
    _check_outputs(args)
    import_libraries()
    from ..train.tokenizer import train_tokenizer

    books = {k: v for k, v in (("codebook_size", args.codebook_size), ("codebook_dim", args.codebook_dim))
             if v is not None}
    metrics = train_tokenizer(**_common_kwargs(args), arch=args.arch, **options, **books,
                              l1_weight=args.l1_weight, restart_every=args.restart_every,
                              restart_until=args.restart_until, test_limit=args.test_limit, rfid=args.rfid,
                              init_from=args.init_from, gan_weight=args.gan_weight, gan_start=args.gan_start,
                              decoder_only=args.train_decoder_only)
    if metrics:
        test = metrics["test"]
        rfid = f"  rFID {test['rfid']:.2f}" if test.get("rfid") is not None else ""
        print(f"tokenizer ({args.arch}): {args.out}/model  test PSNR {test['psnr_db']:.2f} dB  "
              f"codebook usage {100 * test['codebook_usage']:.1f}%{rfid}  ({metrics['export_dtype']})")
    return 0


def _run_gpt(args) -> int:
    if args.distill_cfg is not None and args.distill_from is None:
        raise ArgenError("--distill-cfg is the guidance of a distilled teacher: add --distill-from MODEL")
    if args.init_from is not None:  # a typo is refused now, not after the codes cache is built
        from ..hub import resolve_model_dir

        resolve_model_dir(args.init_from)
    _check_outputs(args)
    import_libraries()
    from ..train.gpt import train_gpt

    metrics = train_gpt(**_common_kwargs(args), model_type=args.model_type, vq=args.vq, size=args.size,
                        dim=args.dim, n_layer=args.n_layer, n_head=args.n_head, dropout=args.dropout,
                        class_dropout=args.class_dropout, flip=args.flip, codes_cache=args.codes_cache,
                        text_encoder=args.text_encoder, tokenizer_name=args.tokenizer_name,
                        text_pooling=args.text_pooling, text_max_length=args.text_max_length,
                        captions=args.captions, init_from=args.init_from,
                        cfg_scale=args.cfg_scale, refiner=args.refiner, coarse_clusters=args.coarse_clusters,
                        kmeans_seed=args.kmeans_seed, shuffle=args.shuffle, shuffle_blocks=args.shuffle_blocks,
                        shuffle_hidden=args.shuffle_hidden, shuffle_mlp=args.shuffle_mlp,
                        distill_from=args.distill_from,
                        distill_cfg=args.distill_cfg)
    if metrics:
        print(f"gpt ({args.model_type}): {args.out}/model  final loss {metrics['final_train_losses'].get('loss', float('nan')):.4f}"
              f"  ({metrics['export_dtype']})")
    return 0


def _run_refiner(args) -> int:
    _check_outputs(args)
    import_libraries()
    from ..train.refiner import train_refiner

    metrics = train_refiner(**_common_kwargs(args), vq=args.vq, num_clusters=args.clusters,
                            kmeans_seed=args.kmeans_seed, normalize=args.normalize, dim=args.dim,
                            n_layer=args.n_layer, n_head=args.n_head, dropout=args.dropout,
                            class_dropout=args.class_dropout, temperature=args.temperature,
                            restrict=not args.no_restrict, flip=args.flip, codes_cache=args.codes_cache)
    if metrics:
        t = metrics["test_fp32"]
        print(f"refiner: {args.out}/model  test loss {t['loss']:.4f}  accuracy {100 * t['accuracy']:.1f}% "
              f"(restricted {100 * t['accuracy_restricted']:.1f}%)  ({metrics['export_dtype']})")
    return 0
