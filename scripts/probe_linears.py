"""Which kernel streams a model's decode-step matrices fastest, and is it bit-identical?

The levers of issue 12 for the fp32 batch-1 step, each measured on the model's own matrices
(one pass over all of them = one decode step's weight reads), interleaved, medians:

* kernels: `F.linear` (MKL sgemm, what the model runs), `mm(x, W^T)` on a pre-transposed copy,
  the transposed product `(W @ x^T)^T` (the few rows become MKL's narrow N side, not its M side),
  oneDNN prepacked (`mkldnn._reorder_linear_weight` + `_linear_pointwise`, what inductor's
  freezing uses), for fp32 and bf16; `torch._weight_int8pack_mm` for int8 (bf16 and fp32 inputs);
* rows: 1 (the floor), 2 (batch 1 with CFG), 4 (2 rows padded to 4);
* fused w1|w3: one product over the concatenated FFN matrices instead of two.

Each fp32 alternative is also checked for bit-identity with `F.linear` on the same rows: a kernel
that changes the float32 results would change samples, which issue 12 forbids.

    python scripts/probe_linears.py --size GPT-B --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="GPT-B")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rows", default="1,2,4")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from argen.bench.decode import random_gpt
    from argen.bench.load import CpuLoad

    model = random_gpt(args.size)
    weights = [m.weight.detach() for m in model.decode_linears()]
    rows_list = [int(r) for r in args.rows.split(",")]
    nbytes32 = sum(w.numel() * 4 for w in weights)

    w_t = [w.t().contiguous() for w in weights]
    packed32 = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    w16 = [w.to(torch.bfloat16) for w in weights]
    packed16 = [torch.ops.mkldnn._reorder_linear_weight(w) for w in w16]
    from argen.models.quant import quantize_int8

    q8 = [quantize_int8(w) for w in weights]
    q8_f32 = [(q, s.float()) for q, s in q8]
    ffn = [(weights[i + 2], weights[i + 3]) for i in range(0, len(weights) - 1, 5)]  # (w1, w3) per layer
    fused = [torch.cat([a, b]) for a, b in ffn]

    def inputs(rows, dtype):
        return {k: torch.randn(rows, k).to(dtype) for k in {w.shape[1] for w in weights}}

    def make(kind, rows):
        x32, x16 = inputs(rows, torch.float32), inputs(rows, torch.bfloat16)
        if kind == "fp32 F.linear":
            return lambda: [F.linear(x32[w.shape[1]], w) for w in weights]
        if kind == "fp32 mm(x, W^T copy)":
            return lambda: [torch.mm(x32[w.shape[0]], w) for w in w_t]
        if kind == "fp32 (W @ x^T)^T":
            return lambda: [torch.mm(w, x32[w.shape[1]].t()).t() for w in weights]
        if kind == "fp32 oneDNN packed":
            return lambda: [torch.ops.mkldnn._linear_pointwise(x32[w.shape[1]], pk, None, "none", [], "")
                            for w, pk in zip(weights, packed32)]
        if kind == "bf16 F.linear":
            return lambda: [F.linear(x16[w.shape[1]], w) for w in w16]
        if kind == "bf16 oneDNN packed":
            return lambda: [torch.ops.mkldnn._linear_pointwise(x16[w.shape[1]], pk, None, "none", [], "")
                            for w, pk in zip(w16, packed16)]
        if kind == "int8 int8pack_mm (bf16 x)":
            return lambda: [torch._weight_int8pack_mm(x16[q.shape[1]], q, s) for q, s in q8]
        if kind == "int8 int8pack_mm (fp32 x)":
            return lambda: [torch._weight_int8pack_mm(x32[q.shape[1]], q, s) for q, s in q8_f32]
        if kind == "fp32 FFN w1,w3 separate":
            return lambda: [(F.linear(x32[a.shape[1]], a), F.linear(x32[b.shape[1]], b)) for a, b in ffn]
        if kind == "fp32 FFN w1|w3 fused":
            return lambda: [F.linear(x32[w.shape[1]], w) for w in fused]
        raise KeyError(kind)

    kinds = ["fp32 F.linear", "fp32 mm(x, W^T copy)", "fp32 (W @ x^T)^T", "fp32 oneDNN packed", "bf16 F.linear", "bf16 oneDNN packed",
             "int8 int8pack_mm (bf16 x)", "int8 int8pack_mm (fp32 x)", "fp32 FFN w1,w3 separate",
             "fp32 FFN w1|w3 fused"]
    tasks = {(k, r): make(k, r) for k in kinds for r in rows_list}
    for f in tasks.values():
        f()
    times = {key: [] for key in tasks}
    with CpuLoad() as load:
        for rnd in range(args.rounds):
            keys = list(tasks)
            keys = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
            for key in keys:
                start = time.perf_counter()
                tasks[key]()
                times[key].append(time.perf_counter() - start)
    base = {r: statistics.median(times[("fp32 F.linear", r)]) for r in rows_list}
    floor = base[1] if 1 in base else None

    # bit-identity of the fp32 alternatives with F.linear
    same = {}
    for r in rows_list:
        x = inputs(r, torch.float32)
        ref = [F.linear(x[w.shape[1]], w) for w in weights]
        alt_t = [torch.mm(x[w.shape[0]], w) for w in w_t]
        alt_p = [torch.ops.mkldnn._linear_pointwise(x[w.shape[1]], pk, None, "none", [], "")
                 for w, pk in zip(weights, packed32)]
        same[("fp32 mm(x, W^T copy)", r)] = all(torch.equal(a, b) for a, b in zip(ref, alt_t))
        alt_wx = [torch.mm(w, x[w.shape[1]].t()).t() for w in weights]
        same[("fp32 (W @ x^T)^T", r)] = all(torch.equal(a, b) for a, b in zip(ref, alt_wx))
        same[("fp32 oneDNN packed", r)] = all(torch.equal(a, b) for a, b in zip(ref, alt_p))
        sep = [F.linear(x[a.shape[1]], a) for a, _ in ffn] + [F.linear(x[b.shape[1]], b) for _, b in ffn]
        fus = [F.linear(x[w.shape[1]], w) for w in fused]
        n = len(ffn)
        hid = ffn[0][0].shape[0]
        same[("fp32 FFN w1|w3 fused", r)] = all(torch.equal(sep[i], fus[i][:, :hid]) and
                                                torch.equal(sep[n + i], fus[i][:, hid:]) for i in range(n))
        if r > 1:  # are 2 rows through one GEMM the same as each row alone (the 1-row kernel)?
            one = [torch.cat([F.linear(x[w.shape[1]][i:i + 1], w) for i in range(r)]) for w in weights]
            same[("fp32 F.linear", r)] = all(torch.equal(a, b) for a, b in zip(ref, one))

    print(f"{args.size}: {len(weights)} decode-step matrices, {nbytes32 / 1e6:.0f} MB in fp32; "
          f"{args.threads} threads, medians of {args.rounds} interleaved rounds\n")
    print("| kernel | rows | ms per pass | vs fp32 F.linear at 1 row (the floor) | GB/s of its own bytes | "
          "float32 results = F.linear |")
    print("|---|---|---|---|---|---|")
    for (kind, r), ts in times.items():
        t = statistics.median(ts)
        if kind.startswith("fp32 FFN"):
            nbytes = sum(a.numel() * 8 for a, _ in ffn)
        elif kind.startswith("fp32"):
            nbytes = nbytes32
        elif kind.startswith("bf16"):
            nbytes = nbytes32 // 2
        else:
            nbytes = nbytes32 // 4
        flag = same.get((kind, r))
        flag = "–" if flag is None else ("yes" if flag else "no")
        ratio = f"{t / floor:.2f}×" if floor and not kind.startswith("fp32 FFN") else "–"
        print(f"| {kind} | {r} | {t * 1e3:.2f} | {ratio} | {nbytes / t / 1e9:.1f} | {flag} |")
    if load.report is not None:
        print(f"\nother processes used {load.report.other_cores:.2f} of {load.report.cpus} cores on average")
        if load.report.busy:
            print(load.report.warning(args.threads))


if __name__ == "__main__":
    main()
