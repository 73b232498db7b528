"""`argen eval`: sample for evaluation, FID / IS / precision-recall / class accuracy, reference statistics.

    argen eval fid --model default-c2i --sampler ar --num-samples 10000 --out runs/x
    argen eval fid --samples runs/x --ref fashion-mnist:test
    argen eval sample --model default-t2i --num-samples 10000 --out runs/t2i --npz
    argen eval ref-stats --ref fashion-mnist:test --floor 10000

Sampling and feature extraction are split over processes when launched by accelerate or torchrun
(image i is the same whatever the number of processes), and sampling resumes where a killed run
stopped:

    accelerate launch --num_processes 2 -m argen eval fid ...               (GPUs)
    accelerate launch --multi_gpu --num_processes 2 -m argen eval fid ...   (CPU-only machine: gloo)
    torchrun --nproc_per_node 2 -m argen eval fid ...

(`accelerate launch --cpu` always starts a single process unless given an MPI hostfile.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..atomic import atomic_write_json, check_output_file, sign_json
from ..checks import MAX_SEED
from ..errors import ArgenError
from .checked import (SEED, THREADS, add_compile_arg, add_decoding_args, add_drafter_arg, add_sampling_args,
                      add_weights_arg, decoding_args, number, sampling_args)
from .startup import import_libraries

COUNT = number(1, integer=True)


def _add_extractor_args(p):
    p.add_argument("--extractor", default="fmnist", choices=("fmnist", "inception"),
                   help="feature network: the shipped Fashion-MNIST classifier (default) or the 2015 TF-Inception")
    p.add_argument("--protocol", default=None,
                   help="inception only: adm (= torch-fidelity, legacy TF resize; comparable with LlamaGen/ADM "
                        "numbers, the default) or clean (clean-fid's resize: a different metric)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="inception weights file (default $ARGEN_INCEPTION_WEIGHTS); never downloaded")
    p.add_argument("--ref", default="fashion-mnist:test",
                   help="reference: fashion-mnist:test (default), fashion-mnist:train, an image folder or an .npz")
    p.add_argument("--ref-num", type=number(2, integer=True), default=None, metavar="N", help="use N reference images (default all)")
    p.add_argument("--feature-batch-size", type=COUNT, default=None, metavar="B",
                   help="images per feature-network call (default 500 fmnist, 32 inception)")
    p.add_argument("--device", default=None, help="device for the networks (default: accelerate's, else cpu)")
    p.add_argument("--threads", type=THREADS, default=0, help="torch threads per process (0 = torch default)")


def _add_sampling_args(p, required_out: bool):
    p.add_argument("--model", default=None, help="pipeline name (default-c2i, default-t2i) or folder to sample from")
    p.add_argument("--sampler", default="ar", help="sampler name or spec with options, e.g. ar, gsd:G=10")
    add_weights_arg(p)
    add_compile_arg(p)
    add_drafter_arg(p)
    add_decoding_args(p)
    p.add_argument("--sampler-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="sampler option (repeatable), e.g. --sampler-opt G=10")
    p.add_argument("--num-samples", type=COUNT, default=10000, help="images to generate (default 10000)")
    p.add_argument("--batch-size", type=COUNT, default=16, help="images per sampler call and process (default 16)")
    add_sampling_args(p)
    p.add_argument("--seed", type=SEED, default=0, help="image i uses seed SEED+i (default 0)")
    p.add_argument("--num-tokens", type=number(1, None, integer=True), default=None, metavar="K",
                   help="sample only the first K tokens and decode that prefix (tokenizers that decode prefixes, "
                        "e.g. FlexTok; default: all)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="t2i: prompt file (.txt one per line, or .jsonl {prompt, label}); image i uses prompt i "
                        "(cycled). Default: argen's held-out Fashion-MNIST prompts, class i %% 10")
    p.add_argument("--out", required=required_out, default=None,
                   help="output folder: samples/NNNNNN.png, samples.jsonl, sampling.json, metrics.json")
    p.add_argument("--npz", nargs="?", const=True, default=None, metavar="PATH",
                   help="also write an ADM sample batch (arr_0) for the official evaluator (default OUT/samples.npz)")


def register(sub):
    parser = sub.add_parser("eval", help="FID / IS / class accuracy of samples; reference statistics",
                            description="Evaluate generators: sample N images (resumable, multi-process with "
                                        "accelerate launch) and score them against reference statistics.")
    kinds = parser.add_subparsers(dest="eval_kind", metavar="KIND")

    f = kinds.add_parser("fid", help="sample from --model (or take --samples) and compute FID/IS/P/R/class accuracy")
    _add_sampling_args(f, required_out=False)
    f.add_argument("--samples", default=None, metavar="PATH",
                   help="score existing samples instead: a sampling output folder, an image folder or an ADM .npz")
    _add_extractor_args(f)
    f.add_argument("--subsets", type=number(0, integer=True), default=0, metavar="K",
                   help="also report FID over K disjoint subsets (mean ± std): FID noise at N/K samples")
    f.add_argument("--floor", action=argparse.BooleanOptionalAction, default=None,
                   help="also compute the real-data floor (train vs test at the same N; default on for fmnist)")
    f.add_argument("--json", default=None, metavar="PATH", help="metrics JSON (default OUT/metrics.json)")
    f.set_defaults(func=run_fid)

    s = kinds.add_parser("sample", help="only generate the evaluation samples (PNGs, optionally an ADM npz)")
    _add_sampling_args(s, required_out=True)
    s.add_argument("--device", default=None, help="device (default: accelerate's, else cpu)")
    s.add_argument("--threads", type=THREADS, default=0, help="torch threads per process (0 = torch default)")
    s.set_defaults(func=run_sample)

    pr = kinds.add_parser("prompts", help="prompt accuracy: per-class and overall, scored by the fmnist classifier")
    pr.add_argument("--model", default="default-t2i", help="pipeline name or folder (a c2i model samples the labels)")
    pr.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                    help="labelled prompts {prompt, label} (default: argen/data/prompts_heldout.jsonl)")
    pr.add_argument("--num-images", type=COUNT, default=4, help="images per prompt (default 4)")
    pr.add_argument("--seed", type=SEED, default=0, help="image j of prompt i uses seed SEED + i * N + j")
    pr.add_argument("--cfg-scale", type=number(0, 100), default=None,
                    help="classifier-free guidance (default: the model's)")
    pr.add_argument("--sampler", default="ar")
    pr.add_argument("--batch-size", type=COUNT, default=64)
    pr.add_argument("--threads", type=THREADS, default=0, help="torch threads (0 = torch default)")
    pr.add_argument("--json", default=None, metavar="PATH", help="write the full result (per prompt too) here")
    pr.set_defaults(func=run_prompts)

    r = kinds.add_parser("ref-stats", help="compute (and cache) reference statistics; optionally the real-data floor")
    _add_extractor_args(r)
    r.add_argument("--out", default=None, metavar="FILE.npz",
                   help="also write the statistics here (mu, sigma, argen_meta, feats)")
    r.add_argument("--adm", action="store_true",
                   help="with --out: write an ADM reference batch instead (arr_0 = the reference images, RGB)")
    r.add_argument("--floor", type=number(0, integer=True), default=0, metavar="N",
                   help="also report the real-data floor: FID of N images of the other Fashion-MNIST split")
    r.add_argument("--refresh", action="store_true", help="recompute even if cached")
    r.add_argument("--json", default=None, metavar="PATH", help="write what was computed (and the floor) here")
    r.set_defaults(func=run_ref_stats)
    t = kinds.add_parser("tokenizer", help="reconstruction quality of a tokenizer on the Fashion-MNIST test split: "
                                           "PSNR, codebook usage, reconstruction FID (fmnist features)")
    t.add_argument("--tokenizer", required=True, help="tokenizer folder or shipped name (default-vq, titok-fmnist-k16)")
    t.add_argument("--num-images", type=number(2, 10000, integer=True), default=10000,
                   help="first N test images (default all 10000)")
    t.add_argument("--num-tokens", type=number(1, integer=True), default=None, metavar="K",
                   help="decode only the first K codes (tokenizers that decode prefixes, such as FlexTok)")
    add_decoding_args(t, dtype=False)
    t.add_argument("--seed", type=SEED, default=0,
                   help="test image i decodes from seed SEED + i (random decoders, FlexTok's; another seed shows "
                        "how much rFID moves with the decoder's noise alone; default 0)")
    t.add_argument("--threads", type=THREADS, default=0, help="torch threads (0 = torch default)")
    t.add_argument("--json", default=None, metavar="PATH", help="also write the metrics here")
    t.set_defaults(func=run_tokenizer)
    parser.set_defaults(func=lambda args: parser.print_help())


# --------------------------------------------------------------------------- helpers


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _setup(args):
    import_libraries()
    import torch

    if args.device:  # an unknown name or a missing GPU: one line, not torch's traceback
        from ..checks import check_device

        check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..distributed import process_state

    state = process_state(args.device)
    device = args.device or str(state.device)
    return state, device


def _sampler_spec(args):
    from ..bench.samplers import parse_spec

    text = args.sampler
    if args.sampler_opt:
        extra = ",".join(o.strip() for o in args.sampler_opt)
        text = f"{text},{extra}" if ":" in text else f"{text}:{extra}"
    spec = parse_spec(text)
    return spec.name, spec.options, spec.label


def _check_sampling_args(args):
    if args.num_samples < 1:
        raise ArgenError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.batch_size < 1:
        raise ArgenError(f"--batch-size must be >= 1, got {args.batch_size}")


def _sample(args, state, device):
    from ..pipeline import ARPipeline
    from ..eval.sampling import generate_samples, read_prompt_file

    _check_sampling_args(args)
    name, options, label = _sampler_spec(args)
    prompts = read_prompt_file(args.prompts) if args.prompts else None
    pipe = ARPipeline.from_pretrained(args.model, device=device, weights=args.weights, drafter=args.drafter,
                                      decoding=decoding_args(args), decoder_dtype=args.decoder_dtype)
    num_tokens = pipe.check_num_tokens(args.num_tokens)
    if args.compile:
        pipe.compile(args.compile)
    params = pipe.sampling_params(args.cfg_scale, **sampling_args(args))
    summary = generate_samples(pipe, args.out, args.num_samples, sampler=name, sampler_options=options, params=params,
                               seed=args.seed, batch_size=args.batch_size, prompts=prompts, model_name=str(args.model),
                               state=state, log=_log, num_tokens=num_tokens)
    from ..distributed import gather_objects

    parts = gather_objects(summary, state.num_processes)
    sampled = sum(p["sampled"] for p in parts)
    nfe = [p["nfe_per_image"] * p["sampled"] for p in parts if p["sampled"]]
    total = {"generated": sum(p["generated"] for p in parts), "skipped": sum(p["skipped"] for p in parts),
             "nfe_per_image": sum(nfe) / sampled if sampled else None,
             "seconds": max(p["seconds"] for p in parts), "processes": len(parts), "sampler_label": label,
             "tokens_per_image": num_tokens or pipe.generator.num_positions}
    state.wait_for_everyone()
    return total


def _write_npz(args, state, samples):
    """The ADM sample batch (arr_0, uint8 RGB) of ``samples``, written by the main process."""
    if not args.npz or not state.is_main_process:
        return None
    from ..eval.npz import write_sample_npz
    from ..eval.quality import resolve_samples
    from ..eval.reference import read_image_files

    path = Path(args.out) / "samples.npz" if args.npz is True else Path(args.npz)
    source = resolve_samples(samples)
    images = source.images if source.files is None else read_image_files(source.files, f"samples in {samples}")
    write_sample_npz(path, images)
    _log(f"wrote ADM sample batch {path} (arr_0, {len(source)} images)")
    return path


def _atomic_json(path: Path, data: dict) -> None:
    atomic_write_json(path, sign_json(data), default=_json_default)  # signed: a re-run may replace it


def _check_before_work(args, sampling: bool) -> None:
    """Every argument and output that can be checked before torch is imported and any work starts;
    then the sampler spec (which needs the sampler classes), before any model is loaded."""
    from ..eval.npz import check_npz_output
    from ..eval.sampling import check_eval_dir

    if sampling:
        if args.seed + args.num_samples - 1 > MAX_SEED:
            raise ArgenError(f"--seed {args.seed} + --num-samples {args.num_samples}: image seeds would pass "
                             f"{MAX_SEED}")
    if getattr(args, "out", None) and args.eval_kind != "ref-stats":
        check_eval_dir(args.out)
    if getattr(args, "json", None):
        check_output_file(args.json, (".json",), "--json")
    if getattr(args, "npz", None) not in (None, True):
        check_npz_output(args.npz, "--npz")
    if getattr(args, "ref", None) is not None:  # a typo in --ref is refused now, not after the sampling
        from ..eval.reference import list_image_files, parse_ref

        kind, value = parse_ref(args.ref)
        if kind == "folder":
            list_image_files(value, "reference folder")
    if sampling:
        import_libraries()
        _sampler_spec(args)


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _extractor(args, device):
    from ..eval.features import get_extractor

    return get_extractor(args.extractor, protocol=args.protocol, inception_weights=args.inception_weights,
                         device=device, batch_size=args.feature_batch_size)


# --------------------------------------------------------------------------- commands


def run_sample(args) -> int:
    if not args.model:
        raise ArgenError("argen eval sample needs --model")
    _check_before_work(args, sampling=True)
    state, device = _setup(args)
    summary = _sample(args, state, device)
    _write_npz(args, state, args.out)
    if state.is_main_process:
        print(f"{summary['generated']} image(s) generated, {summary['skipped']} already present, "
              f"{summary['processes']} process(es) -> {Path(args.out) / 'samples'}")
    return 0


def run_fid(args) -> int:
    if (args.model is None) == (args.samples is None):
        raise ArgenError("give --model (sample, then score) or --samples (score existing samples), not both or neither")
    if args.model is not None and not args.out:
        raise ArgenError("--model needs --out: the folder for the samples and metrics")
    if args.samples is not None and args.npz and not args.out:
        raise ArgenError("--npz with --samples needs --out")
    if args.model is not None and args.num_samples < 2:
        raise ArgenError(f"--num-samples must be at least 2 for FID (a covariance needs 2 samples), "
                         f"got {args.num_samples}")
    if args.model is not None and args.subsets and args.num_samples // args.subsets < 2:
        raise ArgenError(f"--subsets {args.subsets} leaves {args.num_samples // args.subsets} of --num-samples "
                         f"{args.num_samples} per subset; need at least 2")
    _check_before_work(args, sampling=args.model is not None)
    from ..eval.quality import evaluate_samples, format_table

    state, device = _setup(args)
    start = time.perf_counter()
    extractor = _extractor(args, device)  # fail on a missing weights file before sampling for hours
    sampling = None
    samples = args.out if args.model is not None else args.samples
    if args.model is not None:
        sampling = _sample(args, state, device)
    elif args.out and state.is_main_process:
        from ..eval.sampling import claim_eval_dir

        claim_eval_dir(args.out)  # metrics.json (and the npz) of --samples go there: mark it as argen's
    _write_npz(args, state, samples)
    metrics = evaluate_samples(samples, extractor=extractor,
                               ref=args.ref, ref_num=args.ref_num, floor=args.floor, state=state, log=_log,
                               subsets=args.subsets)
    if metrics is None:  # not the main process
        return 0
    if sampling is not None:
        metrics["sampling_run"] = sampling
    metrics["seconds"] = time.perf_counter() - start
    json_path = Path(args.json) if args.json else (Path(args.out) / "metrics.json" if args.out else None)
    if json_path is not None:
        _atomic_json(json_path, metrics)
    print(format_table(metrics))
    if json_path is not None:
        print(f"metrics -> {json_path}")
    return 0


def run_ref_stats(args) -> int:
    from ..eval.npz import check_npz_output

    if args.adm and not args.out:
        raise ArgenError("--adm needs --out FILE.npz")
    if args.floor == 1:
        raise ArgenError("--floor must be 0 (off) or at least 2 images (FID needs 2), got 1")
    if args.out:
        check_npz_output(args.out, "--out")
    _check_before_work(args, sampling=False)
    import_libraries()
    from ..eval.npz import write_stats_npz
    from ..eval.reference import load_reference_images, real_data_floor, reference_stats

    state, device = _setup(args)
    if not state.is_main_process:
        return 0
    extractor = _extractor(args, device)
    stats = reference_stats(extractor, args.ref, args.ref_num, refresh=args.refresh, log=_log)
    record = {"ref": stats.meta(), "extractor": extractor.identity(), "feature_dim": int(stats.mu.shape[0])}
    print(f"{stats.dataset}: N={stats.n}, {stats.mu.shape[0]}-d {extractor.describe()}")
    if stats.path:
        print(f"statistics: {stats.path}")
    if args.out:
        if args.adm:
            images, _, _ = load_reference_images(args.ref, args.ref_num)
            path = write_stats_npz(args.out, stats.mu, stats.sigma, images=images)
            print(f"ADM reference batch (arr_0, {len(images)} images): {path}")
        else:
            path = write_stats_npz(args.out, stats.mu, stats.sigma, meta={**stats.meta(), "path": None},
                                   feats=stats.feats, probs=stats.probs)
            print(f"statistics copy: {path}")
    if args.floor:
        floor = real_data_floor(extractor, args.floor, args.ref, ref_stats=stats, log=_log)
        if floor is None:
            raise ArgenError("--floor needs a Fashion-MNIST reference (fashion-mnist:test or :train) and N up to the "
                             "size of the other split")
        record["floor"] = floor
        print(f"real-data floor: FID {floor['fid']:.4f} ({floor['real_set']} N={floor['num']} vs {floor['ref']})")
    if args.json:
        _atomic_json(Path(args.json), record)
    return 0


def run_prompts(args) -> int:
    if args.json:  # before any work: never replace the user's file, never write a non-.json one
        check_output_file(args.json, (".json",), "--json")
    import_libraries()
    import torch

    from ..eval.prompts import format_accuracy, load_labelled_prompts, prompt_accuracy
    from ..pipeline import ARPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = load_labelled_prompts(args.prompts)
    pipe = ARPipeline.from_pretrained(args.model)
    result = prompt_accuracy(pipe, prompts, num_images=args.num_images, seed=args.seed, cfg_scale=args.cfg_scale,
                             batch_size=args.batch_size, sampler=args.sampler, progress=sys.stderr.isatty())
    result["model"] = str(args.model)
    result["prompts_file"] = str(args.prompts or "argen/data/prompts_heldout.jsonl")
    print(format_accuracy(result))
    if args.json:
        _atomic_json(Path(args.json), result)
        print(f"result -> {args.json}")
    return 0


def run_tokenizer(args) -> int:
    """Same evaluation as the end of `argen train tokenizer --rfid` (`evaluate_tokenizer`)."""
    if args.json:
        check_output_file(args.json, (".json",), "--json")
    if args.seed + args.num_images - 1 > MAX_SEED:
        raise ArgenError(f"--seed {args.seed} is too large: image seeds would pass {MAX_SEED}")
    from ..hub import resolve_model_dir

    folder = resolve_model_dir(args.tokenizer)
    import_libraries()
    import torch

    from ..data.fashion_mnist import load_fashion_mnist
    from ..registry import load_component
    from ..tokenizers.base import ImageTokenizer
    from ..train.tokenizer import IMAGE_SIZE, evaluate_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_component(folder, ImageTokenizer).float().eval()
    if tok.image_size != IMAGE_SIZE or tok.image_channels != 1:
        raise ArgenError(f"{args.tokenizer}: the Fashion-MNIST evaluation needs a 1-channel {IMAGE_SIZE}x{IMAGE_SIZE} "
                         f"tokenizer, got {tok.image_channels} x {tok.image_size}x{tok.image_size}")
    decoding = tok.set_decoding(**decoding_args(args)).decoding_settings
    images, labels = load_fashion_mnist("test")
    t0 = time.time()
    m = evaluate_tokenizer(tok, images[:args.num_images], labels=labels[:args.num_images], rfid=True,
                           num_tokens=args.num_tokens, seed=args.seed)
    m["tokenizer"] = str(args.tokenizer)
    m["tokens_per_image"] = args.num_tokens or tok.num_tokens
    m.update(decoding)
    m["seed"] = args.seed
    m["seconds"] = round(time.time() - t0, 1)
    print(f"{args.tokenizer}: {m['tokens_per_image']} tokens/image, test PSNR {m['psnr_db']:.2f} dB (28x28), "
          f"codebook usage {100 * m['codebook_usage']:.1f}% ({m['codes_used']}/{m['codebook_size']}), "
          f"rFID {m['rfid']:.3f}, classifier accuracy on reconstructions {100 * m['recon_class_accuracy']:.1f}% "
          f"(N={m['test_images']}"
          + "".join(f", {k.replace('_', ' ')} {v:g}" for k, v in decoding.items()) + ")")
    if args.json:
        _atomic_json(Path(args.json), m)
    return 0
