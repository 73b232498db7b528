"""`argen bench`: speed measurements, each printing ratios measured side by side in one run."""

from __future__ import annotations

import sys

from ..atomic import atomic_write_json, atomic_write_text, check_output_file, sign_json, sign_text
from ..checks import MAX_SEED
from ..errors import ArgenError
from .checked import (SEED, THREADS, add_compile_arg, add_decoding_args, add_drafter_arg, add_sampling_args,
                      add_weights_arg, decoding_args, number, sampling_args)
from .startup import import_libraries

COUNT = number(1, integer=True)


def register(sub):
    p = sub.add_parser("bench", help="benchmarks: decode steps against the weight floor, samplers and "
                                      "generators side by side, feature extraction")
    kinds = p.add_subparsers(dest="bench_kind", metavar="KIND")
    d = kinds.add_parser("decode", help="ms per decode step and tokens/s against the memory floor "
                                        "(the model's own matrices streamed at 1 row)")
    d.add_argument("--size", default="GPT-B", help="official GPT size with random weights (default GPT-B)")
    d.add_argument("--model", default=None,
                   help="time this pipeline's generator instead (a shipped name such as default-c2i, or a folder)")
    d.add_argument("--tokens", type=COUNT, default=256, help="image tokens (default 256 = 16x16; --model: its own)")
    d.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    d.add_argument("--cfg-scale", type=number(0), default=2.0)
    d.add_argument("--variants", default="fp32,bf16,int8",
                   help="comma-separated weight formats: fp32 (MKL, the exact reference), fp32-packed (oneDNN), "
                        "bf16, int8 (weight-only, per-channel scales)")
    d.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODES",
                   help="also measure torch.compile'd variants, one per comma-separated mode (default, "
                        "max-autotune, max-autotune-cpp; default: default)")
    d.add_argument("--llamagen", metavar="PATH", default=None,
                   help="a checkout of the official LlamaGen code: also time its generate() against argen's "
                        "sampler end to end, same weights and seed (GPT sizes only)")
    d.add_argument("--e2e-batch-sizes", default="1", help="batch sizes of the --llamagen comparison (default 1)")
    d.add_argument("--e2e-tokens", type=COUNT, default=None,
                   help="tokens per image in the --llamagen comparison (default all; fewer = a shorter run)")
    d.add_argument("--e2e-variants", default=None,
                   help="argen variants in the --llamagen comparison (default: every eager variant)")
    d.add_argument("--agreement-tokens", type=number(0, integer=True), default=64,
                   help="greedy tokens compared with fp32 per variant (0 = skip; default 64)")
    d.add_argument("--rounds", type=COUNT, default=5, help="interleaved measurement rounds (default 5)")
    d.add_argument("--threads", type=THREADS, default=0, help="torch threads (0 = torch default)")
    d.add_argument("--window-cost", default="", metavar="T,T,...",
                   help="also time a T-token forward against a 1-token one (fp32 eager): the cost of "
                        "verifying a speculative window on a model of this size")
    d.add_argument("--json", help="write the records to this JSON file")
    d.set_defaults(func=run_decode)

    s = kinds.add_parser("samplers", help="NFE, step compression and wall-clock of samplers vs AR (+ FID)")
    s.add_argument("samplers", nargs="+", help="sampler specs, e.g. ar sjd mcsjd gsd:G=3 gsd:G=10")
    s.add_argument("--model", default="default-c2i", help="pipeline name or folder (default default-c2i); several "
                   "comma-separated (default-c2i,titok-c2i) are timed in the same interleaved rounds, each at its own "
                   "default CFG, speed-ups also against the first one's AR")
    s.add_argument("--decode", action="store_true", help="time the decode to images too (tokenizer included)")
    s.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    s.add_argument("--num-images", type=COUNT, default=32, help="images per setting and round (default 32)")
    s.add_argument("--rounds", type=COUNT, default=3, help="timed rounds after a warm-up (default 3)")
    add_sampling_args(s)
    s.add_argument("--seed", type=SEED, default=0)
    s.add_argument("--fid", type=number(0, integer=True), default=0, metavar="N",
                   help="also sample N images per sampler (untimed, at the largest batch size) and score them "
                        "with argen.eval (FID/IS/class accuracy); NFE is then averaged over these N")
    s.add_argument("--quality-from", metavar="JSON",
                   help="take FID/IS/class accuracy from an earlier `--fid` run's JSON (same model and sampling "
                        "settings): samples do not depend on the batch size, so quality need not be re-sampled "
                        "to re-time")
    add_compile_arg(s)
    add_weights_arg(s)
    add_drafter_arg(s)
    add_decoding_args(s, dtype=False)
    s.add_argument("--decoder-dtype", default="fp32", metavar="fp32|bf16[,...]",
                   help="dtype of the networks that turn tokens into images (the tokenizer's decoder and a refiner): "
                        "one for every model, or one per --model entry, so that each model can run in its own fastest "
                        "setting (default fp32)")
    s.add_argument("--num-tokens", type=COUNT, default=None, metavar="K",
                   help="sample only the first K tokens of each image with every model whose tokenizer decodes "
                        "prefixes (flextok-c2i); other models sample whole sequences (default: every token)")
    s.add_argument("--forward-cost", default="1,2,4,8,16", metavar="T,T,...",
                   help="also time a T-token forward against a 1-token one at each batch size "
                        "(the cost of verifying a window; empty to skip)")
    s.add_argument("--threads", type=THREADS, default=0)
    s.add_argument("--json", help="write one record per sampler setting and batch size")
    s.add_argument("--md", help="write the Markdown table here too (.md)")
    s.add_argument("--plot", help="a .png file: speed-up vs FID (or vs step compression)")
    s.set_defaults(func=run_samplers)

    f = kinds.add_parser("features", help="feature-extraction throughput (images/s) of an eval extractor")
    f.add_argument("--extractor", choices=("fmnist", "inception"), default="fmnist")
    f.add_argument("--protocol", default=None, help="inception only: adm (default) or clean")
    f.add_argument("--inception-weights", metavar="PATH", default=None,
                   help="inception weights file (default $ARGEN_INCEPTION_WEIGHTS)")
    f.add_argument("--random-weights", action="store_true",
                   help="inception: time a randomly initialised network of the same architecture")
    f.add_argument("--num-images", type=number(2, integer=True), default=1000, help="Fashion-MNIST test images per pass")
    f.add_argument("--batch-size", type=number(0, integer=True), default=0, help="images per network call (0 = extractor default)")
    f.add_argument("--rounds", type=COUNT, default=3)
    f.add_argument("--threads", type=THREADS, default=0)
    f.add_argument("--json", help="write the record to this JSON file")
    f.set_defaults(func=run_features)
    p.set_defaults(func=lambda args: p.print_help())


MAX_LIST_VALUE = 4096  # batch sizes and window lengths; as generate's --batch-size (a huge one overflowed torch)


def _int_list(text: str, what: str):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ArgenError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ArgenError(f"{what} must be positive integers, got {text!r}")
    if max(values) > MAX_LIST_VALUE:
        raise ArgenError(f"{what} values must be at most {MAX_LIST_VALUE}, got {max(values)}")
    return values


def _check_json(args) -> None:
    if args.json:
        check_output_file(args.json, (".json",), "--json")


def run_decode(args) -> int:
    side = int(round(args.tokens ** 0.5))
    if args.model is None and side * side != args.tokens:
        raise ArgenError(f"--tokens must be a square number (a token grid), got {args.tokens}")
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    e2e_batch_sizes = _int_list(args.e2e_batch_sizes, "--e2e-batch-sizes")
    if args.window_cost:
        _int_list(args.window_cost, "--window-cost")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    _check_json(args)
    if args.llamagen and args.model:
        raise ArgenError("--llamagen compares official GPT sizes with random weights; drop --model")
    if not args.llamagen and (args.e2e_variants or args.e2e_tokens):
        raise ArgenError("--e2e-variants and --e2e-tokens set the --llamagen comparison: add --llamagen PATH")

    import_libraries()
    import torch

    from ..bench.decode import (bench_decode, bench_end_to_end, build_variants, compiled_label, end_to_end_table,
                                greedy_agreement, load_official, markdown_table, official_twin, parse_compile_modes,
                                random_gpt, to_records)
    from ..bench.load import CpuLoad, probe
    from ..models import GPTConfig
    from ..models.quant import WEIGHT_FORMATS
    from ..samplers import SamplingParams

    if args.model is None and args.size not in GPTConfig.NAMED_SIZES:
        raise ArgenError(f"unknown size {args.size!r}; choose one of {', '.join(GPTConfig.NAMED_SIZES)}")
    unknown = [v for v in variants if v not in WEIGHT_FORMATS]
    if unknown or not (variants or args.window_cost):
        raise ArgenError(f"unknown variant(s) {unknown}; choose from {', '.join(WEIGHT_FORMATS)} "
                         "(an empty list is allowed with --window-cost)")
    compile_modes = parse_compile_modes(args.compile)
    if args.llamagen:  # a wrong checkout is refused now, not after the timing
        load_official(args.llamagen)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    before = probe(1.0)  # a busy machine is reported before minutes of timing, and again after
    if before is not None and before.busy:
        print(before.warning(threads), file=sys.stderr, flush=True)
    params = SamplingParams(cfg_scale=args.cfg_scale)
    if args.model is not None:
        from ..pipeline import ARPipeline

        def make(fmt):
            return ARPipeline.from_pretrained(args.model, weights=fmt).generator.eval()

        models = {fmt: make(fmt) for fmt in variants}
        for mode in compile_modes:
            models.update({compiled_label(fmt, mode): make(fmt).compile_decode(mode) for fmt in variants})
        tokens = next(iter(models.values())).num_positions if models else args.tokens
        what = f"{args.model} ({sum(p.numel() for p in make('fp32').parameters()) / 1e6:.1f}M parameters)"
    else:
        models = build_variants(args.size, variants, compile_modes, block_size=args.tokens)
        tokens = args.tokens
        what = f"{args.size} with random weights"
    chosen = []
    if args.llamagen and models:  # as is a variant that is not timed
        chosen = ([v.strip() for v in args.e2e_variants.split(",") if v.strip()] if args.e2e_variants
                  else [label for label in models if "+" not in label])
        missing = [v for v in chosen if v not in models]
        if missing:
            raise ArgenError(f"--e2e-variants {missing} are not among the timed variants {list(models)}")
    results, e2e, agreement = [], [], {}
    with CpuLoad() as load:
        if models:
            results = bench_decode(models, batch_sizes, params, tokens, args.rounds)
            print(f"Decode step, {what}, CFG {args.cfg_scale:g}, {threads} threads, medians of {args.rounds} "
                  "interleaved rounds:\n")
            print(markdown_table(results), flush=True)
        if args.llamagen and models:
            fp32 = models.get("fp32") or random_gpt(args.size, block_size=args.tokens)
            official, generate = official_twin(fp32, args.size, args.llamagen)
            e2e_tokens = min(args.e2e_tokens or tokens, tokens)
            e2e = bench_end_to_end({v: models[v] for v in chosen}, official, generate, e2e_batch_sizes, params,
                                   e2e_tokens, args.rounds)
            print(f"\nWhole images (first {e2e_tokens} tokens, sampling, same weights and seed), official LlamaGen "
                  "generate() vs argen ARSampler, interleaved:\n")
            print(end_to_end_table(e2e), flush=True)
        reference = models.get("fp32")
        if args.agreement_tokens and reference is not None:
            n = min(args.agreement_tokens, tokens)
            for label, model in models.items():
                # compiled variants are the eager ones traced (same logits, or to rounding with frozen
                # weights); their static-shape graphs would recompile for every cache length the check uses
                if label != "fp32" and "+" not in label:
                    agreement[label] = greedy_agreement(model, reference, 2, params, n)
    curves = []
    if args.window_cost:
        from ..bench.samplers import forward_cost, forward_cost_table

        windows = sorted({1, *_int_list(args.window_cost, "--window-cost")})
        model = random_gpt(args.size, block_size=args.tokens)
        curves = forward_cost(model, batch_sizes, windows, cfg=args.cfg_scale > 1,
                              repeats=10)
    if curves:
        print(f"\nCost of one T-token forward relative to a 1-token forward ({args.size}, fp32 eager):\n")
        print(forward_cost_table(curves))
    if agreement:
        print(f"\nGreedy tokens against fp32 (2 samples, first {min(args.agreement_tokens, tokens)} tokens): "
              + "; ".join(f"{k}: free-running {v['free_running']:.1%}, teacher-forced {v['teacher_forced']:.1%}"
                          for k, v in agreement.items()))
    report = load.report
    print(f"torch {torch.__version__}, {threads} threads, {_cpu_name()}")
    if report is not None:
        print(f"other processes used {report.other_cores:.2f} of {report.cpus} cores on average during the run")
        if report.busy:
            print(report.warning(threads), file=sys.stderr)
    if args.json:
        atomic_write_json(args.json, sign_json({
            "results": to_records(results), "end_to_end": to_records(e2e), "greedy_agreement": agreement,
            "window_cost": curves, "model": args.model or args.size, "tokens": tokens, "threads": threads,
            "rounds": args.rounds, "cpu": _cpu_name(), "torch": torch.__version__,
            "load_before": None if before is None else before.__dict__,
            "load": None if report is None else {**report.__dict__, "busy": report.busy}}))
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def _per_model(text: str, names: list, flag: str, choices: tuple) -> dict:
    """A flag's value for each model: one value for all, or a comma-separated value per --model entry."""
    values = [v.strip() for v in text.split(",")]
    if len(values) not in (1, len(names)) or any(v not in choices for v in values):
        raise ArgenError(f"{flag} takes one of {', '.join(choices)}, or one per --model entry ({len(names)}), "
                         f"got {text!r}")
    return dict(zip(names, values * len(names) if len(values) == 1 else values))


def _set_decoding(pipes: dict, decoding: dict) -> None:
    """--flow-steps / --decoder-guidance go to every model whose tokenizer has a flow decoder (a
    comparison may hold others); a one-line error when none has."""
    refusals = []
    for pipe in pipes.values():
        try:
            pipe.tokenizer.set_decoding(**decoding)
        except ArgenError as err:
            refusals.append(str(err))
    if refusals and len(refusals) == len(pipes):
        raise ArgenError(refusals[0])


def run_samplers(args) -> int:
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    if args.forward_cost:
        _int_list(args.forward_cost, "--forward-cost")
    if args.fid and args.quality_from:
        raise ArgenError("give --fid (measure quality) or --quality-from (reuse it), not both")
    if args.fid == 1:
        raise ArgenError("--fid must be 0 (off) or at least 2 images (FID needs 2), got 1")
    if args.seed + max(args.num_images, args.fid, 64) > MAX_SEED:
        raise ArgenError(f"--seed {args.seed} is too large: image seeds would pass {MAX_SEED}")
    _check_json(args)
    if args.md:
        check_output_file(args.md, (".md",), "--md")
    if args.plot:
        check_output_file(args.plot, (".png",), "--plot")
    import_libraries()
    from ..samplers.spec import parse_spec

    specs = [parse_spec(text) for text in args.samplers]  # a bad spec is refused before the model loads

    import torch

    from ..bench.samplers import (bench_samplers, copy_quality, load_quality, markdown_table, plot,
                                  write_json)
    from ..pipeline import ARPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.model.split(",") if m.strip()]
    if not names or len(set(names)) != len(names):
        raise ArgenError(f"--model: give one model or distinct comma-separated models, got {args.model!r}")
    if len(names) > 1 and args.quality_from:
        raise ArgenError("--quality-from takes one model; measure several models' quality with --fid")
    dtypes = _per_model(args.decoder_dtype, names, "--decoder-dtype", ("fp32", "bf16"))
    pipes = {name: ARPipeline.from_pretrained(name, weights=args.weights, drafter=args.drafter,
                                              decoder_dtype=dtypes[name]) for name in names}
    decoder_dtype = dtypes[names[0]] if len(set(dtypes.values())) == 1 else dtypes  # as recorded
    _set_decoding(pipes, decoding_args(args))
    model_params = {name: p.sampling_params(args.cfg_scale, **sampling_args(args)) for name, p in pipes.items()}
    pipe = pipes[names[0]]
    params = model_params[names[0]]
    cfg = params.cfg_scale if len(names) == 1 else {n: p.cfg_scale for n, p in model_params.items()}
    quality = None
    if args.fid:
        from ..eval.quality import quality_scorer  # FID/IS/class accuracy on the fmnist classifier

        quality = quality_scorer(args.fid)
    if args.compile:
        for p in pipes.values():
            p.compile(args.compile)
    earlier_quality = None
    # the flow decoders' settings, by model: images depend on them beyond the weights
    decoding = {n: p.tokenizer.decoding_settings for n, p in pipes.items() if p.tokenizer.decoding_settings}
    # the rest of the sampling settings (the scale is `cfg`): quality measured under others is not copied
    sampling = {k: getattr(params, k) for k in ("cfg_interval", "cfg_schedule", "temperature", "top_k", "top_p")}
    if args.quality_from:  # checked before hours of timing, used after
        earlier_quality = load_quality(args.quality_from, {"model": args.model, "cfg_scale": cfg, "seed": args.seed,
                                                           "decoding": decoding, "decoder_dtype": decoder_dtype,
                                                           "num_tokens": args.num_tokens, "sampling": sampling})
    records = bench_samplers(pipe if len(names) == 1 else pipes, specs, batch_sizes, args.num_images, params,
                             args.rounds, args.seed, quality=quality, quality_images=args.fid,
                             log=lambda m: print(m, flush=True), decode=args.decode, model_params=model_params,
                             num_tokens=args.num_tokens)
    if args.quality_from:
        copy_quality(records, earlier_quality)
    table = markdown_table(records)
    curves = []
    if args.forward_cost:
        from ..bench.samplers import forward_cost, forward_cost_table

        windows = sorted({1, *_int_list(args.forward_cost, "--forward-cost")})
        for name, p in pipes.items():
            curve = forward_cost(p, batch_sizes, windows, cfg=model_params[name].uses_cfg)
            curves += [dict(c, model=name) for c in curve] if len(names) > 1 else curve
            table += (f"\n\nCost of one T-token forward relative to a 1-token forward"
                      f"{' (' + name + ')' if len(names) > 1 else ''}:\n\n" + forward_cost_table(curve))
    from ..bench.samplers import target_entropy

    entropies = {}
    for name, p in pipes.items():
        entropy = entropies[name] = target_entropy(p, min(args.num_images, 64), model_params[name], args.seed)
        table += (f"\n\nTarget distributions along {entropy['images']} AR samples"
                  f"{' of ' + name if len(names) > 1 else ''}: mean entropy "
                  f"{entropy['mean_entropy_nats']:.2f} nats, mean top-1 probability {entropy['mean_top1_prob']:.2f}, "
                  f"{entropy['share_top1_above_0.9']:.0%} of positions with top-1 > 0.9")
    entropy = entropies[names[0]] if len(names) == 1 else entropies
    print(table)
    meta = {"model": args.model, "cfg_scale": cfg, "cfg_schedule": params.cfg_schedule, "num_images": args.num_images, "rounds": args.rounds,
            "fid_images": args.fid, "compile": args.compile, "decode_included": args.decode, "quality_from": args.quality_from, "seed": args.seed, "forward_cost": curves, "target_entropy": entropy,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    meta["decoding"], meta["decoder_dtype"], meta["num_tokens"] = decoding, decoder_dtype, args.num_tokens
    meta["sampling"] = sampling
    if args.json:
        write_json(records, args.json, meta)
    if args.md:
        atomic_write_text(args.md, sign_text(table + "\n"))
    if args.plot:
        plot(records, args.plot)
    return 0


def run_features(args) -> int:
    _check_json(args)
    import_libraries()
    import torch

    from ..bench.features import bench_features

    if args.threads:
        torch.set_num_threads(args.threads)
    record = bench_features(args.extractor, args.num_images, args.batch_size, args.rounds, args.protocol,
                            args.inception_weights, args.random_weights)
    record["threads"] = torch.get_num_threads()
    weights = " (random weights, same architecture)" if record["random_weights"] else ""
    print(f"{record['extractor']} ({record['protocol']}){weights}: {record['images_per_second']:.1f} images/s "
          f"({record['num_images']} images, batch {record['batch_size']}, {record['threads']} threads)")
    if args.json:
        atomic_write_json(args.json, sign_json(record))
    return 0
