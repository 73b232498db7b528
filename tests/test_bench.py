"""Benchmark plumbing on tiny models (the numbers themselves come from scripts, not tests)."""

import json

import pytest
import torch

from argen.bench.decode import bench_decode, weight_bytes_per_step
from argen.bench.samplers import bench_samplers, markdown_table, parse_spec, plot, write_json
from argen.data.fashion_mnist import CLASS_NAMES
from argen.errors import ArgenError
from argen.pipeline import ARPipeline
from argen.samplers import SamplingParams

from helpers import tiny_gpt
from test_pipeline import tiny_vq


def test_parse_spec():
    spec = parse_spec("ar:sample=false")
    assert spec.name == "ar" and spec.options == {"sample": False}
    for bad in ("nope", "ar:sample", "ar:bogus=1"):
        with pytest.raises(ArgenError):
            parse_spec(bad)


def test_bench_samplers_records_and_outputs(tmp_path):
    pipe = ARPipeline(tiny_gpt(), tiny_vq(), class_names=CLASS_NAMES)
    specs = [parse_spec("ar"), parse_spec("ar:sample=false")]
    records = bench_samplers(pipe, specs, [1, 2], 4, SamplingParams(cfg_scale=2.0), rounds=1, log=lambda m: None)
    assert len(records) == 4
    for r in records:
        assert r.nfe_per_image == 16 and r.step_compression == pytest.approx(1.0)
        assert r.accepted_per_forward == pytest.approx(1.0) and r.seconds_per_image > 0
    assert records[0].wallclock_speedup == pytest.approx(1.0)
    write_json(records, tmp_path / "r.json", {"model": "tiny"})
    data = json.loads((tmp_path / "r.json").read_text())
    needed = {"sampler", "params", "batch_size", "nfe_per_image", "step_compression", "accepted_per_forward",
              "seconds_per_image", "wallclock_speedup", "fid", "is", "class_accuracy"}
    assert needed <= set(data["records"][0])
    plot(records, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert markdown_table(records).count("\n") == 5


@torch.no_grad()
def test_bench_decode_tiny():
    model = tiny_gpt(vocab_size=64, num_classes=10)
    result = bench_decode(model, "fp32", 2, SamplingParams(cfg_scale=2.0), tokens=16, rounds=2)
    assert result.rows == 4 and result.ms_per_step > 0 and result.roofline_ms > 0
    assert weight_bytes_per_step(model) == sum(p.numel() * 4 for n, p in model.named_parameters() if "embedding" not in n)
