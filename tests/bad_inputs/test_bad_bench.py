"""Bad inputs to `argen bench decode | samplers | features`: every case exits 2 with one line, before
any timing, and leaves the user's files as they were (docs/reliability.md, "argen bench")."""

from __future__ import annotations

import json

import pytest
import torch

from argen.atomic import is_argen_file
from conftest import assert_refused, cli

DECODE = ["bench", "decode", "--size", "GPT-B", "--tokens", "16", "--batch-sizes", "1", "--rounds", "1"]
SAMPLERS = ["bench", "samplers", "ar", "--batch-sizes", "1", "--num-images", "1", "--rounds", "1"]
FEATURES = ["bench", "features", "--num-images", "4", "--rounds", "1"]


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def scene(tmp_path):
    """Files made before the user's folder is snapshotted (request it before `userdir`)."""
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "table.md").write_text("| my | table |\n")
    return tmp_path


CASES = {
    # bench decode
    "decode-tokens-negative": (DECODE[:4] + ["--tokens", "-4"], ["--tokens", "got -4"]),
    "decode-tokens-zero": (DECODE[:4] + ["--tokens", "0"], ["--tokens", "got 0"]),
    "decode-tokens-not-square": (DECODE[:4] + ["--tokens", "15"], ["--tokens", "square"]),
    "decode-threads-negative": (DECODE + ["--threads", "-1"], ["--threads"]),
    "decode-rounds-zero": (DECODE[:-1] + ["0"], ["--rounds"]),
    "decode-cfg-scale-nan": (DECODE + ["--cfg-scale", "nan"], ["--cfg-scale", "finite"]),
    "decode-batch-sizes-zero": (DECODE + ["--batch-sizes", "1,0"], ["--batch-sizes"]),
    "decode-size-unknown": (["bench", "decode", "--size", "GPT-ZZ", "--tokens", "16"], ["GPT-ZZ"]),
    "decode-json-user-file": (DECODE + ["--json", "results.json"], ["'results.json'", "not written by argen"]),
    "decode-json-folder": (DECODE + ["--json", "dir.json"], ["is a folder"]),
    "decode-json-below-a-file": (DECODE + ["--json", "notes.txt/d.json"], ["is a file, not a folder"]),
    # options of the --llamagen comparison without it (until session 40: ignored, the run went on)
    "decode-e2e-variants-without-llamagen": (DECODE + ["--e2e-variants", "fp32"], ["--e2e-variants", "--llamagen"]),
    "decode-e2e-tokens-without-llamagen": (DECODE + ["--e2e-tokens", "4"], ["--e2e-tokens", "--llamagen"]),
    # bench samplers: specs before the model loads, outputs before the timing
    "samplers-spec-G-abc": (["bench", "samplers", "gsd:G=abc"], ["gsd"]),
    "samplers-spec-L-nan": (["bench", "samplers", "sjd:L=nan"], ["sjd"]),
    "samplers-spec-G-empty": (["bench", "samplers", "gsd:G="], ["gsd"]),
    "samplers-spec-unknown": (["bench", "samplers", "nope"], ["unknown sampler"]),
    "samplers-plot-not-png": (SAMPLERS + ["--plot", "r.txt"], ["--plot", ".png"]),
    "samplers-plot-user-png": (SAMPLERS + ["--plot", "out.png"], ["'out.png'", "not written by argen"]),
    "samplers-plot-folder": (SAMPLERS + ["--plot", "out"], ["--plot", ".png"]),
    "samplers-md-user-file": (SAMPLERS + ["--md", "table.md"], ["'table.md'", "not written by argen"]),
    "samplers-md-not-md": (SAMPLERS + ["--md", "notes.txt"], ["--md", ".md"]),
    "samplers-json-user-file": (SAMPLERS + ["--json", "results.json"], ["not written by argen"]),
    "samplers-json-folder": (SAMPLERS + ["--json", "dir.json"], ["is a folder"]),
    "samplers-num-images-zero": (SAMPLERS + ["--num-images", "0"], ["--num-images"]),
    "samplers-fid-one": (SAMPLERS + ["--fid", "1"], ["--fid", "at least 2"]),
    "samplers-threads-negative": (SAMPLERS + ["--threads", "-1"], ["--threads"]),
    "samplers-temperature-nan": (SAMPLERS + ["--temperature", "nan"], ["--temperature", "finite"]),
    "samplers-seed-negative": (SAMPLERS + ["--seed", "-1"], ["--seed"]),
    "samplers-decoder-dtype-unknown": (SAMPLERS + ["--decoder-dtype", "fp16"], ["--decoder-dtype", "'fp16'"]),
    "samplers-decoder-dtype-per-model-count": (SAMPLERS + ["--model", "default-c2i,titok-c2i", "--decoder-dtype",
                                                          "fp32,bf16,fp32"], ["--decoder-dtype", "one per --model"]),
    # bench features
    "features-num-images-one": (["bench", "features", "--num-images", "1"], ["--num-images"]),
    "features-rounds-zero": (FEATURES[:-1] + ["0"], ["--rounds"]),
    "features-batch-size-negative": (FEATURES + ["--batch-size", "-1"], ["--batch-size"]),
    "features-threads-negative": (FEATURES + ["--threads", "-1"], ["--threads"]),
    "features-json-user-file": (FEATURES + ["--json", "results.json"], ["not written by argen"]),
    "features-json-folder": (FEATURES + ["--json", "dir.json"], ["is a folder"]),
    "features-json-below-a-file": (FEATURES + ["--json", "out.png/f.json"], ["is a file, not a folder"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bench_refuses(scene, userdir, case):
    args, fragments = CASES[case]
    outcome = cli(*args)
    assert_refused(outcome, *fragments)


def test_bench_decode_refuses_a_wrong_llamagen_checkout_before_timing(userdir):
    """Until session 40 the --llamagen path was read after the whole decode timing (minutes at the defaults),
    whose table was printed first."""
    outcome = cli(*DECODE, "--variants", "fp32", "--agreement-tokens", "0", "--llamagen", "notes.txt")
    assert_refused(outcome, "--llamagen notes.txt", "no autoregressive/models/gpt.py")
    assert outcome.out == ""


# ---- positive controls: argen's own outputs are re-written ----------------------------------------


@pytest.fixture(scope="module")
def tiny_c2i(tmp_path_factory):
    from argen.data.fashion_mnist import CLASS_NAMES
    from argen.pipeline import ARPipeline
    from argen.tokenizers import VQTokenizer
    from helpers import tiny_gpt

    torch.manual_seed(0)
    vq = VQTokenizer(codebook_size=64, codebook_embed_dim=8, ch=32, z_channels=32, encoder_ch_mult=(1, 2, 2, 2),
                     decoder_ch_mult=(1, 2, 2, 2), num_res_blocks=1, in_channels=1, image_size=32).eval()
    path = tmp_path_factory.mktemp("pipes") / "c2i"
    ARPipeline(tiny_gpt(), vq, class_names=CLASS_NAMES, defaults={"cfg_scale": 2.0}).save_pretrained(path)
    return path


def test_bench_samplers_rewrites_its_own_json_md_and_plot(tmp_path, monkeypatch, tiny_c2i):
    monkeypatch.chdir(tmp_path)
    args = [*SAMPLERS, "--model", tiny_c2i, "--forward-cost", "", "--threads", "1", "--json", "s.json", "--md", "s.md",
            "--plot", "s.png"]
    for _ in range(2):
        outcome = cli(*args)
        assert outcome.code == 0, outcome.err
    assert all(is_argen_file(tmp_path / name) for name in ("s.json", "s.md", "s.png"))
    assert json.loads((tmp_path / "s.json").read_text())["records"]


def test_bench_samplers_takes_a_decoder_dtype_per_model(tmp_path, monkeypatch, tiny_c2i):
    """`--decoder-dtype fp32,bf16`: each model decodes in its own dtype (recorded per model), so models can be
    compared each in its fastest setting."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_c2i, tmp_path / "copy")
    outcome = cli(*SAMPLERS, "--model", f"{tiny_c2i},copy", "--decode", "--decoder-dtype", "fp32,bf16",
                  "--forward-cost", "", "--threads", "1", "--json", "s.json")
    assert outcome.code == 0, outcome.err
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["meta"]["decoder_dtype"] == {str(tiny_c2i): "fp32", "copy": "bf16"}
    assert {r["model"] for r in record["records"]} == {str(tiny_c2i), "copy"}


def test_bench_features_rewrites_its_own_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        outcome = cli(*FEATURES, "--threads", "1", "--json", "f.json")
        assert outcome.code == 0, outcome.err
    assert json.loads((tmp_path / "f.json").read_text())["num_images"] == 4
