"""`argen bench`: speed measurements, each printing ratios measured side by side in one run."""

from __future__ import annotations

from ..atomic import atomic_write_json, atomic_write_text, check_output_file, sign_json, sign_text
from ..checks import MAX_SEED
from ..errors import ArgenError
from .checked import SEED, THREADS, number

COUNT = number(1, integer=True)


def register(sub):
    p = sub.add_parser("bench", help="benchmarks (decode speed vs roofline, ...)")
    kinds = p.add_subparsers(dest="bench_kind", metavar="KIND")
    d = kinds.add_parser("decode", help="ms per decode step and tokens/s against the memory roofline")
    d.add_argument("--size", default="GPT-B", help="official GPT size with random weights (default GPT-B)")
    d.add_argument("--tokens", type=COUNT, default=256, help="image tokens (default 256 = 16x16)")
    d.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    d.add_argument("--cfg-scale", type=number(0), default=2.0)
    d.add_argument("--variants", default="fp32,bf16", help="comma-separated dtypes: fp32,bf16")
    d.add_argument("--compile", action="store_true", help="also measure torch.compile'd variants")
    d.add_argument("--rounds", type=COUNT, default=5, help="interleaved measurement rounds (default 5)")
    d.add_argument("--threads", type=THREADS, default=0, help="torch threads (0 = torch default)")
    d.add_argument("--window-cost", default="", metavar="T,T,...",
                   help="also time a T-token forward against a 1-token one (fp32 eager): the cost of "
                        "verifying a speculative window on a model of this size")
    d.add_argument("--json", help="write the records to this JSON file")
    d.set_defaults(func=run_decode)

    s = kinds.add_parser("samplers", help="NFE, step compression and wall-clock of samplers vs AR (+ FID)")
    s.add_argument("samplers", nargs="+", help="sampler specs, e.g. ar sjd mcsjd gsd:G=3 gsd:G=10")
    s.add_argument("--model", default="default-c2i", help="pipeline name or folder (default default-c2i)")
    s.add_argument("--compare", default="", metavar="MODEL,MODEL",
                   help="also run these generators (pipeline names or folders) with the same samplers in the same "
                        "rounds: one table and plot, speed-ups and step compression relative to AR on --model")
    s.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    s.add_argument("--num-images", type=COUNT, default=32, help="images per setting and round (default 32)")
    s.add_argument("--rounds", type=COUNT, default=3, help="timed rounds after a warm-up (default 3)")
    s.add_argument("--cfg-scale", type=number(0), default=None, help="guidance (default: the model's)")
    s.add_argument("--cfg-schedule", choices=["constant", "linear", "cosine"], default="constant",
                   help="guidance over the image: constant (default), linear or cosine (ramp from 1 at the first position to --cfg-scale at the last)")
    s.add_argument("--temperature", type=number(0), default=1.0)
    s.add_argument("--top-k", type=number(0, integer=True), default=0)
    s.add_argument("--top-p", type=number(0, 1, lo_open=True), default=1.0)
    s.add_argument("--seed", type=SEED, default=0)
    s.add_argument("--fid", type=number(0, integer=True), default=0, metavar="N",
                   help="also sample N images per sampler (untimed, at the largest batch size) and score them "
                        "with argen.eval (FID/IS/class accuracy); NFE is then averaged over these N")
    s.add_argument("--quality-from", metavar="JSON",
                   help="take FID/IS/class accuracy from an earlier `--fid` run's JSON (same model and sampling "
                        "settings): samples do not depend on the batch size, so quality need not be re-sampled "
                        "to re-time")
    s.add_argument("--compile", action="store_true", help="torch.compile the generator's decode step first")
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


def _int_list(text: str, what: str):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ArgenError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ArgenError(f"{what} must be positive integers, got {text!r}")
    return values


def _check_json(args) -> None:
    if args.json:
        check_output_file(args.json, (".json",), "--json")


def run_decode(args) -> int:
    side = int(round(args.tokens ** 0.5))
    if side * side != args.tokens:
        raise ArgenError(f"--tokens must be a square number (a token grid), got {args.tokens}")
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    if args.window_cost:
        _int_list(args.window_cost, "--window-cost")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    _check_json(args)

    import torch

    from ..bench.decode import DTYPES, markdown_table, run, to_records
    from ..models import GPTConfig

    if args.size not in GPTConfig.NAMED_SIZES:
        raise ArgenError(f"unknown size {args.size!r}; choose one of {', '.join(GPTConfig.NAMED_SIZES)}")
    unknown = [v for v in variants if v not in DTYPES]
    if unknown or not (variants or args.window_cost):
        raise ArgenError(f"unknown variant(s) {unknown}; choose from {', '.join(DTYPES)} "
                         "(an empty list is allowed with --window-cost)")
    if args.threads:
        torch.set_num_threads(args.threads)
    results, agreement = [], {}
    if variants:
        results, agreement = run(args.size, batch_sizes, args.tokens,
                                 args.cfg_scale, variants, rounds=args.rounds)
    if args.compile and variants:
        more, more_agree = run(args.size, batch_sizes, args.tokens, args.cfg_scale,
                               variants, compile_model=True, rounds=args.rounds)
        results += more
        agreement.update(more_agree)
    curves = []
    if args.window_cost:
        from ..bench.decode import random_gpt
        from ..bench.samplers import forward_cost, forward_cost_table

        windows = sorted({1, *_int_list(args.window_cost, "--window-cost")})
        model = random_gpt(args.size, block_size=args.tokens)
        curves = forward_cost(model, batch_sizes, windows, cfg=args.cfg_scale > 1,
                              repeats=10)
    if results:
        print(markdown_table(results))
    if curves:
        print(f"\nCost of one T-token forward relative to a 1-token forward ({args.size}, fp32 eager):\n")
        print(forward_cost_table(curves))
    if agreement:
        print("greedy-token agreement with fp32 (first 32 tokens, 2 samples): "
              + ", ".join(f"{k} {v:.0%}" for k, v in agreement.items()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.json:
        atomic_write_json(args.json, sign_json({"results": to_records(results), "greedy_agreement": agreement,
                                                "window_cost": curves}))
    return 0


def run_samplers(args) -> int:
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    if args.forward_cost:
        _int_list(args.forward_cost, "--forward-cost")
    if args.fid and args.quality_from:
        raise ArgenError("give --fid (measure quality) or --quality-from (reuse it), not both")
    compare = [m.strip() for m in args.compare.split(",") if m.strip()]
    if compare and args.quality_from:
        raise ArgenError("--quality-from works for one model; drop --compare or re-measure with --fid")
    if len(set([args.model] + compare)) != 1 + len(compare):
        raise ArgenError("--compare: each model once, and not --model again")
    if args.fid == 1:
        raise ArgenError("--fid must be 0 (off) or at least 2 images (FID needs 2), got 1")
    if args.seed + max(args.num_images, args.fid, 64) > MAX_SEED:
        raise ArgenError(f"--seed {args.seed} is too large: image seeds would pass {MAX_SEED}")
    _check_json(args)
    if args.md:
        check_output_file(args.md, (".md",), "--md")
    if args.plot:
        check_output_file(args.plot, (".png",), "--plot")
    from ..samplers.spec import parse_spec

    specs = [parse_spec(text) for text in args.samplers]  # a bad spec is refused before the model loads

    import torch

    from ..bench.samplers import (bench_generators, bench_samplers, copy_quality, load_quality, markdown_table, plot,
                                  write_json)
    from ..pipeline import ARPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = ARPipeline.from_pretrained(args.model)
    params = pipe.sampling_params(args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  cfg_schedule=args.cfg_schedule)
    cfg = params.cfg_scale
    quality = None
    if args.fid:
        from ..eval.quality import quality_scorer  # FID/IS/class accuracy on the fmnist classifier

        quality = quality_scorer(args.fid)
    if args.compile:
        if not hasattr(pipe.generator, "compile_decode"):
            raise ArgenError(f"--compile: {type(pipe.generator).__name__} has no compile_decode()")
        pipe.generator.compile_decode()
    earlier_quality = None
    if args.quality_from:  # checked before hours of timing, used after
        earlier_quality = load_quality(args.quality_from, {"model": args.model, "cfg_scale": cfg, "seed": args.seed})
    if compare:
        pipes = {args.model: pipe, **{m: ARPipeline.from_pretrained(m) for m in compare}}
        for name, other in pipes.items():
            if args.compile and name != args.model:
                other.generator.compile_decode()
        records = bench_generators(pipes, specs, batch_sizes, args.num_images, params, args.rounds, args.seed,
                                   quality=quality, quality_images=args.fid, log=lambda m: print(m, flush=True))
    else:
        records = bench_samplers(pipe, specs, batch_sizes, args.num_images, params, args.rounds, args.seed,
                                 quality=quality, quality_images=args.fid, log=lambda m: print(m, flush=True))
    if args.quality_from:
        copy_quality(records, earlier_quality)
    table = markdown_table(records)
    curves = []
    if args.forward_cost:
        from ..bench.samplers import forward_cost, forward_cost_table

        windows = sorted({1, *_int_list(args.forward_cost, "--forward-cost")})
        curves = forward_cost(pipe, batch_sizes, windows, cfg=params.uses_cfg)
        table += "\n\nCost of one T-token forward relative to a 1-token forward:\n\n" + forward_cost_table(curves)
    from ..bench.samplers import target_entropy

    entropy = target_entropy(pipe, min(args.num_images, 64), params, args.seed)
    table += (f"\n\nTarget distributions along {entropy['images']} AR samples: mean entropy "
              f"{entropy['mean_entropy_nats']:.2f} nats, mean top-1 probability {entropy['mean_top1_prob']:.2f}, "
              f"{entropy['share_top1_above_0.9']:.0%} of positions with top-1 > 0.9")
    print(table)
    meta = {"model": args.model, "compare": compare, "cfg_scale": cfg, "cfg_schedule": params.cfg_schedule, "num_images": args.num_images, "rounds": args.rounds,
            "fid_images": args.fid, "compile": args.compile, "quality_from": args.quality_from, "seed": args.seed, "forward_cost": curves, "target_entropy": entropy,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.json:
        write_json(records, args.json, meta)
    if args.md:
        atomic_write_text(args.md, sign_text(table + "\n"))
    if args.plot:
        plot(records, args.plot)
    return 0


def run_features(args) -> int:
    _check_json(args)
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
