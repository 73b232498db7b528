"""argparse `type=` functions for train / eval / bench: numbers checked finite and in range
(`argen.checks.check_number`) while the arguments are parsed, before anything heavy is imported."""

from __future__ import annotations

import argparse

from ..checks import MAX_SEED, check_number
from ..errors import ArgenError


def number(lo=None, hi=None, *, integer: bool = False, lo_open: bool = False, hi_open: bool = False):
    """A `type=` for a number in [lo, hi] (open ends with lo_open / hi_open); integral with `integer`."""

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if integer else 'a number'}, got {text!r}") \
                from None
        try:
            return check_number("", value, lo, hi, integer=integer, lo_open=lo_open, hi_open=hi_open)
        except ArgenError as err:
            raise argparse.ArgumentTypeError(str(err).strip()) from None

    parse.__name__ = "integer" if integer else "number"
    return parse


SEED = number(0, MAX_SEED, integer=True)
THREADS = number(0, 4096, integer=True)  # 0 = torch's default


# Mirror argen.models.quant.WEIGHT_FORMATS / WEIGHT_CHOICES (a test checks they agree): importing
# that module would load torch before the arguments are checked.
WEIGHT_FORMATS = ("fp32", "fp32-packed", "bf16", "int8")
WEIGHT_CHOICES = ("auto",) + WEIGHT_FORMATS
AUTO_PACK_MB = 32  # argen.models.quant.AUTO_PACK_BYTES in MiB
# Mirrors, for the same reason: argen.samplers.logits.CFG_SCHEDULES, argen.tokenizers.flextok.NESTED_DROPOUT_MODES,
# argen.models.base.COMPILE_MODES.
CFG_SCHEDULES = ("constant", "linear", "cosine")
NESTED_DROPOUT_MODES = ("pow2", "pow2-long", "uniform", "uniform-long")
COMPILE_MODES = ("default", "max-autotune", "max-autotune-cpp")


def add_weights_arg(p, default: str = "fp32") -> None:
    """`--weights`: the generator's decode-step weight format (argen.models.quant)."""
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default=default,
                   help="generator weight format: fp32 (as trained, the exact reference), fp32-packed (the "
                        "same numbers to float32 rounding through oneDNN's packed kernel: faster for large "
                        "models on CPU), bf16, int8 (weight-only, per-channel scales; fewer bytes per decode "
                        f"step), or auto (fp32-packed for a generator of {AUTO_PACK_MB} MiB or more of decode-step "
                        f"weights on CPU, else fp32); default {default}")


def add_compile_arg(p) -> None:
    """`--compile`: torch.compile the generator's decode step, the refiner's pass and a flow decoder's network
    (ARPipeline.compile)."""
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the generator's decode step (and a refiner's pass, a flow decoder's network) "
                        "first: a compile of some "
                        "seconds per batch shape, then faster steps (default-c2i on one CPU thread: 1.8x at "
                        "batch 1, 1.3x at 16 and 50); for many images. MODE max-autotune freezes the weights "
                        "into the graphs (10-20 s per shape) and runs the products through oneDNN's packed kernels "
                        "(default-c2i: 1.2-1.6x default's step in fp32 and bf16 at batch 1 and 16); "
                        "max-autotune-cpp through inductor's own C++ GEMM kernels: 1.9-2.4x default's step at batch 1, "
                        "slower from batch 4. Every mode gives a seed the same image at any batch size "
                        "(default: default)")


def add_sampling_args(p) -> None:
    """The sampling settings every sampling command takes (generate, eval fid, bench samplers), with one
    range and one help text each: `--cfg-scale`, `--cfg-interval`, `--cfg-schedule`, `--temperature`,
    `--top-k`, `--top-p` (argen.samplers.SamplingParams)."""
    p.add_argument("--cfg-scale", type=number(0, 100), default=None,
                   help="classifier-free guidance scale, 0..100; 1 or less turns guidance off "
                        "(default: the model's)")
    p.add_argument("--cfg-interval", type=number(-1, None, integer=True), default=-1, metavar="N",
                   help="guide only image tokens 0..N+1, then sample unguided (LlamaGen semantics); "
                        "-1 (default) guides every token, 0 only the first two")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default=None,
                   help="guidance over the image: constant, linear or cosine (ramp from 1 at the first position to "
                        "--cfg-scale at the last); default: the model's (constant unless its pipeline.json says otherwise)")
    p.add_argument("--temperature", type=number(0, None), default=1.0,
                   help="softmax temperature >= 0 (default 1.0; 0 picks the most likely token)")
    p.add_argument("--top-k", type=number(0, None, integer=True), default=0, metavar="K",
                   help="sample from the K most likely tokens; 0 (default) keeps all")
    p.add_argument("--top-p", type=number(0, 1, lo_open=True), default=1.0, metavar="P",
                   help="sample from the smallest set of tokens holding probability P, in (0, 1]; "
                        "1.0 (default) keeps all")


def sampling_args(args) -> dict:
    """The `SamplingParams` keywords of `add_sampling_args` other than the guidance scale."""
    return dict(cfg_interval=args.cfg_interval, cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p)


def add_drafter_arg(p) -> None:
    """`--drafter`: the draft model of the `draft` sampler, instead of the pipeline's own."""
    p.add_argument("--drafter", metavar="MODEL", default=None,
                   help="draft model for --sampler draft (a generator folder or shipped name trained on the same "
                        "codes); default: the \"drafter\" entry of the model's pipeline.json")


def add_decoding_args(p, dtype: bool = True) -> None:
    """`--flow-steps`, `--decoder-guidance`: decoding settings of a tokenizer with a flow decoder;
    with `dtype`, `--decoder-dtype` (commands that decode generated tokens)."""
    p.add_argument("--flow-steps", type=number(1, 1000, integer=True), default=None, metavar="N",
                   help="Euler steps of the tokenizer's flow decoder (FlexTok; default: the tokenizer's)")
    p.add_argument("--decoder-guidance", type=number(0, 100), default=None, metavar="S",
                   help="the flow decoder's guidance on its registers, 1 = off, each step then runs the decoder "
                        "twice (FlexTok; default: the tokenizer's)")
    p.add_argument("--decoder-guidance-start", type=number(0, 1000, integer=True), default=None, metavar="I",
                   help="the first flow step with register guidance: the I noisiest steps run the decoder once, "
                        "unguided (FlexTok; default: the tokenizer's, 0)")
    if not dtype:
        return
    p.add_argument("--decoder-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of the networks that turn tokens into images (the tokenizer's decoder and a "
                        "refiner): bf16 is faster where the hardware has bf16 matrix units (AVX512-BF16 / AMX CPUs, "
                        "GPUs), with slightly different pixels; a flow decoder still integrates in fp32, a refiner "
                        "samples from fp32 logits (default fp32)")


def decoding_args(args) -> dict:
    """The `set_decoding` keywords the user gave ({} for none)."""
    given = {"steps": args.flow_steps, "guidance_scale": args.decoder_guidance,
             "guidance_start": args.decoder_guidance_start}
    return {k: v for k, v in given.items() if v is not None}
