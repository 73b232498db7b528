"""Benchmark plumbing on tiny models (the numbers themselves come from scripts, not tests)."""

import json
import statistics

import numpy as np
import pytest
import torch

from argen.bench.decode import bench_decode, weight_bytes_per_step
from argen.cli.main import main
from argen.bench.samplers import bench_samplers, markdown_table, parse_spec, plot, read_json, write_json
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
    again = read_json(tmp_path / "r.json")
    assert [r.to_json() for r in again] == data["records"]
    again[0].fid = 10.0  # one setting with FID: plotted against FID, the others left out
    plot(again, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert markdown_table(records).count("\n") == 5


def test_bench_samplers_interleaves_the_settings_batch_by_batch(monkeypatch):
    """Each batch of images runs in every setting before the next batch starts, in alternating order (the hosts
    drift within seconds), and a setting's counters are those of all its images sampled in one call."""
    import argen.bench.samplers as bench

    pipe = ARPipeline(tiny_gpt(), tiny_vq(), class_names=CLASS_NAMES)
    specs = [parse_spec("ar"), parse_spec("sjd:L=4")]
    calls, real = [], bench.run_sampler
    monkeypatch.setattr(bench, "run_sampler", lambda p, sampler, conds, params, bs, seeds, *rest:
                        calls.append((sampler.name, list(seeds))) or real(p, sampler, conds, params, bs, seeds, *rest))
    params = SamplingParams(cfg_scale=2.0)
    records = bench_samplers(pipe, specs, [2], 6, params, rounds=1, log=lambda m: None)
    timed = calls[2:]  # after one warm-up batch per setting
    assert timed == [("ar", [0, 1]), ("sjd", [0, 1]), ("sjd", [2, 3]), ("ar", [2, 3]), ("ar", [4, 5]), ("sjd", [4, 5])]
    _, nfe, accepted, _, _ = real(pipe, bench.make_sampler(specs[1]), bench.benchmark_conditions(pipe, 6), params, 2,
                                  list(range(6)))
    sjd = records[1]
    assert sjd.sampler == "sjd" and sjd.nfe_per_image == pytest.approx(nfe.mean().item())
    assert sjd.accepted_per_forward == pytest.approx(sum(accepted) / len(accepted))
    assert records[0].nfe_per_image == 16 and sjd.nfe_per_image < 16


def test_bench_samplers_scores_a_separate_quality_set_once_per_setting():
    pipe = ARPipeline(tiny_gpt(), tiny_vq(), class_names=CLASS_NAMES)
    specs = [parse_spec("ar"), parse_spec("sjd:L=4")]
    calls = []

    def quality(images, labels):  # records what it was given; the metric itself is tested in test_metrics
        calls.append((images.shape[0], list(labels)))
        return {"fid": float(images.double().mean()), "is": 1.0, "class_accuracy": 0.5}

    records = bench_samplers(pipe, specs, [1, 2], 2, SamplingParams(cfg_scale=2.0), rounds=1,
                             quality=quality, quality_images=6, log=lambda m: None)
    assert [c[0] for c in calls] == [6, 6]  # one scoring per setting, on the 6-image set, not per batch size
    assert calls[0][1] == [i % 10 for i in range(6)]
    by_label = {(r.sampler, r.batch_size): r for r in records}
    assert by_label[("ar", 1)].fid == by_label[("ar", 2)].fid
    assert by_label[("sjd", 1)].nfe_images == 6 and by_label[("sjd", 1)].step_compression > 1.0
    assert by_label[("ar", 1)].num_images == 2  # timing set


@torch.no_grad()
def test_bench_decode_tiny():
    model = tiny_gpt(vocab_size=64, num_classes=10)
    (result,) = bench_decode({"fp32": model}, [2], SamplingParams(cfg_scale=2.0), tokens=16, rounds=2)
    assert result.rows == 4 and result.ms_per_step > 0 and result.floor_ms > 0 and result.old_roofline_ms > 0
    assert weight_bytes_per_step(model) == sum(p.numel() * 4 for n, p in model.named_parameters() if "embedding" not in n)


def test_bench_features_fmnist_on_given_images():
    from argen.bench.features import bench_features

    images = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    record = bench_features("fmnist", num_images=30, batch_size=8, rounds=2, images=images)
    assert record["num_images"] == 30 and record["batch_size"] == 8 and len(record["seconds_rounds"]) == 2
    assert record["images_per_second"] == pytest.approx(30 / statistics.median(record["seconds_rounds"]))


def test_cli_bench_features_bad_input(capsys):
    assert main(["bench", "features", "--num-images", "1"]) == 2
    assert "--num-images" in capsys.readouterr().err


def test_forward_cost_curve_tiny():
    from argen.bench.samplers import forward_cost, forward_cost_table

    curves = forward_cost(ARPipeline(tiny_gpt(), tiny_vq(), class_names=CLASS_NAMES), [1, 2], windows=(1, 4), repeats=3)
    assert [c["rows"] for c in curves] == [2, 4]
    assert all(c["cost"][1] == 1.0 and c["cost"][4] > 0 and c["ms_t1"] > 0 for c in curves)
    assert forward_cost_table(curves).count("\n") == 3
    # a bare generator too: `argen bench decode --window-cost` times its random GPT (it once crashed here)
    bare = forward_cost(tiny_gpt(), [3], windows=(1, 2), repeats=2)
    assert bare[0]["rows"] == 6 and bare[0]["cost"][2] > 0


def test_target_entropy_of_a_flat_model_is_log_vocab():
    from argen.bench.samplers import target_entropy

    gpt = tiny_gpt()
    params = SamplingParams(cfg_scale=2.0)
    stats = target_entropy(ARPipeline(gpt, tiny_vq(), class_names=CLASS_NAMES), 4, params)
    assert 0 < stats["mean_entropy_nats"] < np.log(64) and 1 / 64 < stats["mean_top1_prob"] <= 1
    with torch.no_grad():
        gpt.output.weight.zero_()  # every logit 0: uniform next-token distributions
    flat = target_entropy(ARPipeline(gpt, tiny_vq(), class_names=CLASS_NAMES), 4, params)
    assert flat["mean_entropy_nats"] == pytest.approx(np.log(64), abs=1e-5)
    assert flat["mean_top1_prob"] == pytest.approx(1 / 64) and flat["share_top1_above_0.9"] == 0


def test_quality_from_an_earlier_run_is_matched_by_sampler_and_settings(tmp_path):
    from argen.bench.samplers import Record, copy_quality, load_quality

    def rec(sampler, params, fid=None):
        return Record(sampler, params, 1, 4, 16.0, 1.0, 1.0, 0.1, 10.0, 1.0, fid=fid)

    write_json([rec("ar", {}, 12.0), rec("gsd", {"group_size": 10}, 13.5)], tmp_path / "q.json",
               {"model": "default-c2i", "cfg_scale": 3.0, "seed": 0})
    now = [rec("ar", {}), rec("gsd", {"group_size": 10}), rec("gsd", {"group_size": 3})]
    copy_quality(now, load_quality(tmp_path / "q.json", {"model": "default-c2i", "cfg_scale": 3.0, "seed": 0}))
    assert [r.fid for r in now] == [12.0, 13.5, None]
    with pytest.raises(ArgenError, match="cfg_scale"):
        load_quality(tmp_path / "q.json", {"model": "default-c2i", "cfg_scale": 2.0, "seed": 0})
    # decoder settings: a JSON without them was measured at the tokenizers' stored ones
    assert load_quality(tmp_path / "q.json", {"model": "default-c2i", "decoding": {}})
    with pytest.raises(ArgenError, match="decoding"):
        load_quality(tmp_path / "q.json", {"model": "default-c2i", "decoding": {"m": {"flow_steps": 4}}})
    # sampling settings: a JSON without them was measured at the defaults, with its recorded schedule
    default = {"cfg_interval": -1, "cfg_schedule": "constant", "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert load_quality(tmp_path / "q.json", {"model": "default-c2i", "sampling": default})
    for change in ({"temperature": 0.5}, {"top_k": 100}, {"top_p": 0.9}, {"cfg_interval": 10},
                   {"cfg_schedule": "linear"}):
        with pytest.raises(ArgenError, match="sampling"):
            load_quality(tmp_path / "q.json", {"model": "default-c2i", "sampling": {**default, **change}})
    write_json([rec("ar", {}, 12.0)], tmp_path / "ramp.json", {"model": "ctf-c2i", "cfg_schedule": "linear"})
    assert load_quality(tmp_path / "ramp.json", {"sampling": {**default, "cfg_schedule": "linear"}})
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ArgenError, match="not a sampler-benchmark JSON"):
        load_quality(tmp_path / "bad.json", {})


def test_bench_samplers_times_several_models_together_with_decode(tmp_path):
    """`--model a,b`: every (model, sampler) in the same rounds; speed-ups also against the first model's AR;
    with decode the timed region includes the tokenizer, so a slower decoder shows in the seconds."""
    import time

    class SlowDecode:
        def __init__(self, tok, delay):
            self.tok, self.delay = tok, delay

        def __getattr__(self, name):
            return getattr(self.tok, name)

        def decode(self, codes, **kw):
            calls.append(len(codes))
            time.sleep(self.delay * len(codes))
            return self.tok.decode(codes, **kw)

    calls = []
    a = ARPipeline(tiny_gpt(), tiny_vq(), class_names=CLASS_NAMES)
    b = ARPipeline(tiny_gpt(), tiny_vq(), class_names=CLASS_NAMES)
    b.tokenizer = SlowDecode(b.tokenizer, 0.5)
    specs = [parse_spec("ar"), parse_spec("sjd:L=4")]
    records = bench_samplers({"a": a, "b": b}, specs, [2], 2, SamplingParams(cfg_scale=2.0), rounds=1,
                             log=lambda m: None, decode=True)
    assert [(r.model, r.sampler) for r in records] == [("a", "ar"), ("a", "sjd"), ("b", "ar"), ("b", "sjd")]
    assert all(r.decode_included for r in records)
    rec = {(r.model, r.sampler): r for r in records}
    assert rec[("a", "ar")].speedup_vs_first_ar == pytest.approx(1.0)
    assert rec[("b", "ar")].seconds_per_image > 0.5  # the decode is timed
    assert calls == [2] * 4  # warm-up + 1 round, for ar and sjd
    assert rec[("b", "ar")].speedup_vs_first_ar < 1.0 and rec[("b", "ar")].wallclock_speedup == pytest.approx(1.0)
    table = markdown_table(records)
    assert "| b | sjd:L=4 |" in table and "include decoding" in table
    plot(records, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000
    calls.clear()
    no_decode = bench_samplers({"a": a, "b": b}, specs[:1], [2], 2, SamplingParams(cfg_scale=2.0), rounds=1,
                               log=lambda m: None)
    assert calls == [] and not any(r.decode_included for r in no_decode)


def test_bench_samplers_compares_a_shuffle_generator_side_by_side(tmp_path):
    """One run, two generators ({name: pipeline}): records per (model, sampler); the s = 2
    generator's AR needs 4x fewer forwards, and speed-ups are also given against the first model's AR."""
    from argen.models import TokenShuffleGPT

    from helpers import randomize

    torch.manual_seed(0)
    shuffle = randomize(TokenShuffleGPT(shuffle=2, dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10,
                                        block_size=16), 2)
    pipes = {"plain": ARPipeline(tiny_gpt(), tiny_vq(), class_names=CLASS_NAMES),
             "shuffle": ARPipeline(shuffle, tiny_vq(), class_names=CLASS_NAMES)}
    calls = []

    def quality(images, labels):
        calls.append(images.shape[0])
        return {"fid": float(len(calls)), "is": 1.0, "class_accuracy": 0.5}

    records = bench_samplers(pipes, [parse_spec("ar"), parse_spec("mcsjd:L=4")], [1, 2], 4,
                             SamplingParams(cfg_scale=2.0), rounds=1, quality=quality, quality_images=6,
                             log=lambda m: None)
    by = {(r.model, r.sampler, r.batch_size): r for r in records}
    assert set(by) == {(m, s, b) for b in (1, 2) for m in ("plain", "shuffle") for s in ("ar", "mcsjd")}
    assert by["plain", "ar", 1].speedup_vs_first_ar == pytest.approx(1.0)
    assert by["plain", "ar", 2].nfe_per_image == 16 and by["shuffle", "ar", 2].nfe_per_image == 4
    assert by["shuffle", "mcsjd", 1].nfe_per_image <= 4 and calls == [6, 6, 6, 6]
    assert "| shuffle | mcsjd:L=4 |" in markdown_table(records)
    plot(records, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000
