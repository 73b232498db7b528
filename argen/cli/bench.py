"""`argen bench`: speed measurements, each printing ratios measured side by side in one run."""

from __future__ import annotations

import json

from ..errors import ArgenError


def register(sub):
    p = sub.add_parser("bench", help="benchmarks (decode speed vs roofline, ...)")
    kinds = p.add_subparsers(dest="bench_kind", metavar="KIND")
    d = kinds.add_parser("decode", help="ms per decode step and tokens/s against the memory roofline")
    d.add_argument("--size", default="GPT-B", help="official GPT size with random weights (default GPT-B)")
    d.add_argument("--tokens", type=int, default=256, help="image tokens (default 256 = 16x16)")
    d.add_argument("--batch-sizes", default="1,8", help="comma-separated (default 1,8)")
    d.add_argument("--cfg-scale", type=float, default=2.0)
    d.add_argument("--variants", default="fp32,bf16", help="comma-separated dtypes: fp32,bf16")
    d.add_argument("--compile", action="store_true", help="also measure torch.compile'd variants")
    d.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds (default 5)")
    d.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    d.add_argument("--json", help="write the records to this JSON file")
    d.set_defaults(func=run_decode)
    p.set_defaults(func=lambda args: p.print_help())


def _int_list(text: str, what: str):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ArgenError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ArgenError(f"{what} must be positive integers, got {text!r}")
    return values


def run_decode(args) -> int:
    import torch

    from ..bench.decode import DTYPES, markdown_table, run, to_records
    from ..models import GPTConfig

    if args.size not in GPTConfig.NAMED_SIZES:
        raise ArgenError(f"unknown size {args.size!r}; choose one of {', '.join(GPTConfig.NAMED_SIZES)}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in DTYPES]
    if unknown or not variants:
        raise ArgenError(f"unknown variant(s) {unknown}; choose from {', '.join(DTYPES)}")
    side = int(round(args.tokens ** 0.5))
    if side * side != args.tokens:
        raise ArgenError(f"--tokens must be a square number (a token grid), got {args.tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results, agreement = run(args.size, _int_list(args.batch_sizes, "--batch-sizes"), args.tokens, args.cfg_scale,
                             variants, rounds=args.rounds)
    if args.compile:
        more, more_agree = run(args.size, _int_list(args.batch_sizes, "--batch-sizes"), args.tokens, args.cfg_scale,
                               variants, compile_model=True, rounds=args.rounds)
        results += more
        agreement.update(more_agree)
    print(markdown_table(results))
    print("greedy-token agreement with fp32 (first 32 tokens, 2 samples): "
          + ", ".join(f"{k} {v:.0%}" for k, v in agreement.items()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"results": to_records(results), "greedy_agreement": agreement}, handle, indent=2)
    return 0
