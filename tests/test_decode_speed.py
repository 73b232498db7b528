"""Decode speed plumbing (issue 12): weight formats, the 1-row floor, the busy-machine check and
the end-to-end comparison against an official-style generate(). Tiny models only: speed figures
come from `argen bench decode` runs, recorded in docs/benchmarks.md, never from timed tests."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from argen.bench import load as load_mod
from argen.bench.decode import (Floor, bench_decode, bench_end_to_end, greedy_agreement, load_official,
                                weight_bytes_per_step)
from argen.errors import ArgenError
from argen.models.quant import BF16Linear, FP32PackedLinear, Int8Linear, quantize_int8
from argen.samplers import ARSampler, SamplingParams, get_sampler
from argen.samplers.generate import generate as argen_generate

from helpers import tiny_gpt

CFG = SamplingParams(cfg_scale=2.0)


# ------------------------------------------------------------------ weight formats


def test_int8_quantisation_is_per_channel_and_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 32) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different scale
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (48,)
    err = (w - q.float() * scales.float()[:, None]).abs()
    assert bool((err <= 0.5 * scales.float()[:, None] * 1.01).all())
    assert int(q.abs().amax(1).min()) >= 126  # each row uses its full range: scales are per channel


@pytest.mark.parametrize("cls", [Int8Linear, BF16Linear, FP32PackedLinear])
def test_quantised_linear_is_a_drop_in_replacement(cls):
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=False)
    x = torch.randn(2, 3, 64)
    q = cls(lin)
    y = q(x)
    assert y.shape == (2, 3, 96) and y.dtype == torch.float32
    if cls is Int8Linear:
        ref = F.linear(x.bfloat16().float(), q.dequantized())
    elif cls is BF16Linear:
        ref = F.linear(x.bfloat16().float(), lin.weight.bfloat16().float())
    else:
        ref = F.linear(x, lin.weight)
    tol = 1e-5 if cls is FP32PackedLinear else 2e-2
    assert torch.allclose(y, ref, rtol=tol, atol=tol)
    assert not torch.allclose(y, F.linear(x, torch.zeros_like(lin.weight)))


def test_set_weight_format_converts_the_decode_linears_once():
    model = tiny_gpt()
    assert model.weight_format == "fp32" and all(isinstance(m, nn.Linear) for m in model.decode_linears())
    assert len(model.decode_linears()) == 2 * 5 + 1  # wqkv, wo, w1, w3, w2 per layer + output
    model.set_weight_format("int8")
    assert model.weight_format == "int8" and all(isinstance(m, Int8Linear) for m in model.decode_linears())
    model.set_weight_format("int8")  # same format: nothing to do
    with pytest.raises(ArgenError, match="already int8"):
        model.set_weight_format("bf16")
    with pytest.raises(ArgenError, match="unknown weight format"):
        tiny_gpt().set_weight_format("int4")


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
def test_weight_formats_are_invisible_to_samplers(fmt):
    """Every sampler runs a converted model unchanged, and its next-token decisions stay close to fp32."""
    ref = tiny_gpt()
    model = tiny_gpt().set_weight_format(fmt)
    cond = torch.tensor([1, 4, 9])
    for name in ("ar", "mcsjd"):
        out = get_sampler(name)(model, cond, params=CFG, seeds=[0, 1, 2])
        assert out.tokens.shape == (3, 16)
    agree = greedy_agreement(model, ref, 3, CFG, 16)
    assert agree["teacher_forced"] >= 0.9, agree
    same = greedy_agreement(tiny_gpt(), ref, 3, CFG, 16)  # the metric itself: fp32 against fp32 is exact
    assert same["free_running"] == 1.0 and same["teacher_forced"] == 1.0 and same["first_difference"] == [16] * 3


@pytest.mark.parametrize("cls", [FP32PackedLinear, BF16Linear])
@pytest.mark.parametrize("in_features", [64, 2048])
def test_packed_rows_do_not_depend_on_the_row_count(cls, in_features):
    """Each row's result is the same whether it goes alone, with CFG's twin or in a batch: fewer than
    4 rows are padded to 4, and oneDNN's kernels for 4+ rows give every row the same bits (its 1-row
    kernel does not, for 2048 inputs on the EPYC of docs/history/decode.md)."""
    torch.manual_seed(0)
    lin = cls(nn.Linear(in_features, 48, bias=False))
    x = torch.randn(33, in_features)
    full = lin(x)
    for rows in (1, 2, 3, 4, 5, 10, 32):
        assert torch.equal(lin(x[:rows]), full[:rows]), rows
    if cls is FP32PackedLinear:
        assert torch.allclose(full, F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)


def test_fp32_packed_model_is_fp32_to_rounding():
    """Same weights, oneDNN's summation order: logits within 1e-5 of MKL fp32, teacher-forced and
    step by step, and the same sampled tokens, with and without CFG, at batch 1 and 5."""
    ref, packed = tiny_gpt(), tiny_gpt().set_weight_format("fp32-packed")
    assert packed.weight_format == "fp32-packed"
    assert all(isinstance(m, FP32PackedLinear) for m in packed.decode_linears())
    torch.manual_seed(0)
    idx, cond = torch.randint(0, 64, (3, 15)), torch.tensor([1, 4, 9])
    with torch.no_grad():
        assert (packed(idx, cond) - ref(idx, cond)).abs().max() < 1e-5
        caches = [m.new_cache(3) for m in (ref, packed)]
        for m, c in zip((ref, packed), caches):
            m.prefill(cond, c)
        a, b = (m.decode(idx[:, :4], torch.arange(1, 5), c) for m, c in zip((ref, packed), caches))
        assert (a - b).abs().max() < 1e-5
    cond5 = torch.tensor([1, 4, 9, 0, 7])
    for params in (CFG, SamplingParams()):
        want = ARSampler()(ref, cond5, params=params, seeds=range(5)).tokens
        assert torch.equal(ARSampler()(packed, cond5, params=params, seeds=range(5)).tokens, want)
    one = torch.cat([ARSampler()(packed, cond5[i:i + 1], params=CFG, seeds=[i]).tokens for i in (0, 3)])
    assert torch.equal(one, ARSampler()(ref, cond5, params=CFG, seeds=range(5)).tokens[[0, 3]])


def test_fp32_packed_errors_are_one_line():
    with pytest.raises(ArgenError, match="bias-free"):
        FP32PackedLinear(nn.Linear(8, 8))
    model = tiny_gpt().set_weight_format("fp32-packed")
    with pytest.raises(ArgenError, match="already fp32-packed"):
        model.set_weight_format("int8")
    with pytest.raises(ArgenError, match="already converted"):
        from argen.models.quant import convert_linears
        convert_linears(list(model._linear_slots()), "bf16")


def test_auto_weight_format_packs_only_large_fp32_models(monkeypatch):
    from argen.models import quant

    model = tiny_gpt().set_weight_format("auto")  # a few hundred KB: stays MKL fp32
    assert model.weight_format == "fp32" and all(isinstance(m, nn.Linear) for m in model.decode_linears())
    nbytes = sum(m.weight.numel() * 4 for m in model.decode_linears())
    monkeypatch.setattr(quant, "AUTO_PACK_BYTES", nbytes)
    assert tiny_gpt().set_weight_format("auto").weight_format == "fp32-packed"
    assert tiny_gpt().set_weight_format("int8").set_weight_format("auto").weight_format == "int8"
    monkeypatch.setattr(quant, "AUTO_PACK_BYTES", nbytes + 1)
    assert tiny_gpt().set_weight_format("auto").weight_format == "fp32"


def test_fp32_samples_unchanged_by_the_weight_format_machinery():
    """set_weight_format('fp32') is a no-op: the model draws the same samples."""
    cond = torch.tensor([2, 5])
    a = ARSampler()(tiny_gpt(), cond, params=CFG, seeds=[3, 4]).tokens
    b = ARSampler()(tiny_gpt().set_weight_format("fp32"), cond, params=CFG, seeds=[3, 4]).tokens
    assert torch.equal(a, b)


def test_pipeline_and_cli_take_weights(capsys):
    from argen.cli.main import main
    from argen.pipeline import ARPipeline

    pipe = ARPipeline.from_pretrained("default-c2i", weights="int8")
    assert pipe.generator.weight_format == "int8"
    assert all(isinstance(m, Int8Linear) for m in pipe.generator.decode_linears())
    assert main(["generate", "--class", "0", "--weights", "int4"]) == 2
    assert "--weights" in capsys.readouterr().err
    pipe = ARPipeline.from_pretrained("default-c2i", weights="fp32-packed")
    assert all(isinstance(m, FP32PackedLinear) for m in pipe.generator.decode_linears())


def test_cli_generates_with_fp32_packed_weights(tmp_path, capsys):
    """`argen generate --weights fp32-packed` runs and writes the same image as fp32; the default
    (auto) keeps a model as small as default-c2i in MKL fp32, and says so."""
    from argen.cli.main import main

    out = {}
    for fmt in ("fp32", "fp32-packed", None):
        path = tmp_path / f"{fmt}.png"
        weights = ["--weights", fmt] if fmt else []
        assert main(["generate", "--class", "3", "--num-images", "1", *weights, "--out", str(path)]) == 0
        assert f"weights {fmt or 'fp32'})" in capsys.readouterr().out
        out[fmt] = path.read_bytes()
    assert out["fp32"] == out["fp32-packed"] == out[None]


def test_cli_generate_compile_draws_the_eager_image(tmp_path, monkeypatch):
    """`argen generate --compile` compiles the generator's decode step and writes the same image."""
    from argen.cli.main import main
    from argen.pipeline import ARPipeline

    compiled = []
    real = ARPipeline.compile
    monkeypatch.setattr(ARPipeline, "compile",
                        lambda self, mode="default": compiled.append((self, mode)) or real(self, mode))
    out = {}
    for flags in ([], ["--compile"]):
        path = tmp_path / f"{len(flags)}.png"
        assert main(["generate", "--class", "3", "--num-images", "1", *flags, "--out", str(path)]) == 0
        out[len(flags)] = path.read_bytes()
    assert len(compiled) == 1 and "decode" in vars(compiled[0][0].generator)  # compile_decode replaced it
    assert compiled[0][1] == "default" and out[0] == out[1]
    # a mode that does not exist is a one-line error (exit 2), before anything is loaded
    assert main(["generate", "--class", "3", "--compile", "fastest", "--out", str(tmp_path / "x.png")]) == 2


# ------------------------------------------------------------------ the floor and the bench


def test_floor_streams_the_models_own_matrices():
    fp32, int8 = tiny_gpt(), tiny_gpt().set_weight_format("int8")
    f32, f8 = Floor(fp32), Floor(int8)
    assert f32.matrices == f8.matrices == len(fp32.decode_linears())
    linear_bytes = sum(m.weight.numel() * 4 for m in fp32.decode_linears())
    assert f32.nbytes == linear_bytes
    scales = sum(m.scales.numel() * 2 for m in int8.decode_linears())
    assert f8.nbytes == linear_bytes // 4 + scales
    norms = sum(p.numel() * 4 for n, p in fp32.named_parameters() if n.endswith("norm.weight"))
    assert weight_bytes_per_step(fp32) == linear_bytes + norms
    assert f32.time_once() > 0


@torch.no_grad()
def test_bench_decode_reports_each_format_against_its_floor_and_fp32s():
    models = {"fp32": tiny_gpt(), "int8": tiny_gpt().set_weight_format("int8")}
    results = bench_decode(models, [1, 2], CFG, tokens=16, rounds=2)
    assert [(r.label, r.batch_size, r.rows) for r in results] == [("fp32", 1, 2), ("fp32", 2, 4),
                                                                 ("int8", 1, 2), ("int8", 2, 4)]
    for r in results:
        assert r.ms_per_step > 0 and r.floor_ms > 0 and r.fp32_floor_ms > 0
        assert r.vs_floor == pytest.approx(r.ms_per_step / r.floor_ms)
        assert (r.old_roofline_ms is not None) == (r.label == "fp32")
    fp32_floor = {r.fp32_floor_ms for r in results}
    assert len(fp32_floor) == 1  # one fp32 floor for every variant
    kernels = results[0].fp32_kernel_floors_ms
    assert set(kernels) == {"F.linear (MKL)", "oneDNN packed", "oneDNN packed, padded to 4 rows", "mm(x, W^T copy)"}
    for r in results:  # the fastest fp32 1-row kernel, reported beside each variant's own floor
        assert r.fp32_kernel_floors_ms == kernels and r.fastest_floor_ms == min(kernels.values())
        assert kernels[r.fastest_floor_kernel] == r.fastest_floor_ms
        assert r.vs_fastest_floor == pytest.approx(r.ms_per_step / r.fastest_floor_ms)


def test_fp32_packed_floor_streams_its_own_kernel():
    packed = tiny_gpt().set_weight_format("fp32-packed")
    floor = Floor(packed)
    assert [step.__self__ for step, _ in floor.steps] == packed.decode_linears()  # FP32PackedLinear.matmul
    assert all(x.shape[0] == 1 and x.dtype == torch.float32 for _, x in floor.steps)  # 1 row (padded inside)


def _write_fake_official(root, body: str):
    pkg = root / "autoregressive" / "models"
    pkg.mkdir(parents=True)
    (root / "autoregressive" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "gpt.py").write_text("GPT_models = {}\n")
    (pkg / "generate.py").write_text(body)


@torch.no_grad()
def test_end_to_end_checks_tokens_against_official(tmp_path):
    """An official generate() that draws exactly like LlamaGen's (argen's port of it, which the
    fixture tests hold to the official traces) gives the same tokens; one that does not is caught."""
    model = tiny_gpt()
    records = bench_end_to_end({"fp32": model}, model, argen_generate, [1], CFG, tokens=16, rounds=1)
    assert [r.label for r in records] == ["official generate()", "argen fp32"]
    assert records[1].same_tokens_as_official is True and records[1].speedup_vs_official > 0

    _write_fake_official(tmp_path, "import torch\n"
                                   "def generate(model, cond, n, **kw):\n"
                                   "    return torch.zeros(cond.shape[0], n, dtype=torch.int32)\n")
    _, fake = load_official(str(tmp_path))
    records = bench_end_to_end({"fp32": model}, model, fake, [1], CFG, tokens=16, rounds=1)
    assert records[1].same_tokens_as_official is False


def test_load_official_refuses_a_folder_without_llamagen(tmp_path):
    with pytest.raises(ArgenError, match="no autoregressive/models/gpt.py"):
        load_official(str(tmp_path))


# ------------------------------------------------------------------ busy machine


def test_cpu_load_sees_another_process_spinning():
    spinner = subprocess.Popen([sys.executable, "-c",
                                "import time\nt = time.time()\nwhile time.time() - t < 4: pass"])
    try:
        time.sleep(0.5)  # let it start
        report = load_mod.probe(1.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert report is not None
    assert report.other_cores >= 0.5 and report.busy
    assert "busy" in report.warning(threads=2)


def test_cpu_load_leaves_out_this_process(monkeypatch):
    """Machine busy time minus our own CPU time, per wall second."""
    machine = iter([100.0, 103.0])  # 3 busy seconds machine-wide...
    own = iter([10.0, 12.0])  # ...2 of them ours
    wall = iter([0.0, 1.0])
    monkeypatch.setattr(load_mod, "_machine_busy_seconds", lambda: next(machine))
    monkeypatch.setattr(load_mod, "_own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(load_mod.time, "perf_counter", lambda: next(wall))
    report = load_mod.CpuLoad().start().stop()
    assert report.other_cores == pytest.approx(1.0) and report.busy
    quiet = load_mod.LoadReport(seconds=10, other_cores=0.05, cpus=2)
    assert not quiet.busy and quiet.warning(2) is None
