"""Bad inputs to `argen eval`: every case exits 2 with one line, before any sampling or feature
extraction, and leaves the user's files as they were (docs/reliability.md, "argen eval")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from argen.checks import MAX_SEED
from conftest import assert_refused, cli

FID = ["eval", "fid", "--model", "default-c2i", "--num-samples", "4"]
REF = ["eval", "ref-stats", "--ref-num", "20"]


@pytest.fixture(autouse=True)
def _private_cache_and_threads(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ARGEN_CACHE", str(tmp_path_factory.mktemp("argen_cache")))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _white_squares(folder, n=8):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((32, 32), 255, np.uint8)).save(folder / f"{i:06d}.png")


@pytest.fixture
def scene(tmp_path):
    """Files made before the user's folder is snapshotted (request it before `userdir`)."""
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "dir.npz").mkdir()
    np.savez(tmp_path / "mine.npz", a=np.arange(3))
    _white_squares(tmp_path / "scored" / "samples")  # images argen did not make (item 3)
    return tmp_path


@pytest.fixture(scope="module")
def tiny_c2i(tmp_path_factory):
    """A tiny class-conditional pipeline (32x32 grey, 16 tokens) that samples in milliseconds."""
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


CASES = {
    # --out of eval fid / eval sample: the user's folders (item 3), a file
    "fid-out-user-folder": (FID + ["--out", "out"], ["'out'", "evaluation did not write"]),
    "fid-out-user-run-folder": (FID + ["--out", "run"], ["'run'", "evaluation did not write"]),
    "fid-out-unrecorded-samples": (FID + ["--out", "scored"], ["'scored'", "evaluation did not write"]),
    "fid-out-is-a-file": (FID + ["--out", "notes.txt"], ["is a file"]),
    "fid-samples-out-user-folder": (["eval", "fid", "--samples", "scored", "--out", "scored"],
                                    ["evaluation did not write"]),
    "sample-out-user-folder": (["eval", "sample", "--model", "default-c2i", "--out", "out"],
                               ["evaluation did not write"]),
    # counts (item 7: FID needs 2 samples, refused before sampling)
    "fid-num-samples-one": (FID[:-1] + ["1", "--out", "new"], ["--num-samples", "at least 2"]),
    # a tokenizer given as the model (until session 40: "pass --tokenizer", an option eval does not have)
    "fid-model-is-a-tokenizer": (FID[:2] + ["--model", "default-vq", "--num-samples", "2", "--out", "new"],
                                 ["VQTokenizer is not a Generator"]),
    "fid-num-samples-zero": (FID[:-1] + ["0", "--out", "new"], ["--num-samples"]),
    "sample-num-samples-zero": (["eval", "sample", "--model", "default-c2i", "--out", "new", "--num-samples", "0"],
                                ["--num-samples"]),
    "fid-batch-size-zero": (FID + ["--out", "new", "--batch-size", "0"], ["--batch-size"]),
    "fid-ref-num-one": (FID + ["--out", "new", "--ref-num", "1"], ["--ref-num"]),
    "fid-subsets-negative": (FID + ["--out", "new", "--subsets", "-1"], ["--subsets"]),
    "fid-feature-batch-size-zero": (FID + ["--out", "new", "--feature-batch-size", "0"], ["--feature-batch-size"]),
    # numbers of the sampling settings
    "fid-threads-negative": (FID + ["--out", "new", "--threads", "-1"], ["--threads"]),
    "fid-cfg-scale-nan": (FID + ["--out", "new", "--cfg-scale", "nan"], ["--cfg-scale", "finite"]),
    "fid-temperature-inf": (FID + ["--out", "new", "--temperature", "inf"], ["--temperature", "finite"]),
    "fid-top-p-zero": (FID + ["--out", "new", "--top-p", "0"], ["--top-p"]),
    "fid-top-k-negative": (FID + ["--out", "new", "--top-k", "-1"], ["--top-k"]),
    "fid-cfg-interval-below-minus-one": (FID + ["--out", "new", "--cfg-interval", "-2"], ["--cfg-interval"]),
    "fid-seed-negative": (FID + ["--out", "new", "--seed", "-1"], ["--seed"]),
    "fid-seed-2^64": (FID + ["--out", "new", "--seed", str(2**64)], ["--seed"]),
    "fid-seed-plus-n-overflows": (FID + ["--out", "new", "--seed", str(MAX_SEED - 2)], ["image seeds"]),
    # sampler specs: refused before any model is loaded
    "fid-sampler-unknown": (FID + ["--out", "new", "--sampler", "nope"], ["unknown sampler"]),
    "fid-sampler-G-abc": (FID + ["--out", "new", "--sampler", "gsd:G=abc"], ["gsd"]),
    "fid-sampler-L-nan": (FID + ["--out", "new", "--sampler", "sjd:L=nan"], ["sjd"]),
    "fid-sampler-G-empty": (FID + ["--out", "new", "--sampler", "gsd:G="], ["gsd"]),
    "fid-sampler-opt-unknown": (FID + ["--out", "new", "--sampler-opt", "bogus=1"], ["bogus"]),
    # --json / --npz: the user's files, folders, wrong suffixes, a file on the way (item 6)
    "fid-json-user-file": (FID + ["--out", "new", "--json", "results.json"], ["'results.json'", "not written by argen"]),
    "fid-json-folder": (FID + ["--out", "new", "--json", "dir.json"], ["is a folder"]),
    "fid-json-not-json": (FID + ["--out", "new", "--json", "notes.txt"], [".json"]),
    "fid-json-below-a-file": (FID + ["--out", "new", "--json", "notes.txt/m.json"], ["is a file, not a folder"]),
    "fid-npz-user-file": (FID + ["--out", "new", "--npz", "mine.npz"], ["'mine.npz'", "not written by argen"]),
    "fid-npz-not-npz": (FID + ["--out", "new", "--npz", "out.png"], [".npz"]),
    # eval ref-stats
    "ref-stats-out-not-npz": (REF + ["--out", "notes.txt"], [".npz"]),
    "ref-stats-out-user-npz": (REF + ["--out", "mine.npz"], ["not written by argen"]),
    "ref-stats-out-folder": (REF + ["--out", "dir.npz"], ["is a folder"]),
    "ref-stats-json-user-file": (REF + ["--json", "results.json"], ["not written by argen"]),
    "ref-stats-json-folder": (REF + ["--json", "dir.json"], ["is a folder"]),
    "ref-stats-floor-one": (REF + ["--floor", "1"], ["--floor"]),
    "ref-stats-threads-negative": (REF + ["--threads", "-1"], ["--threads"]),
    "ref-stats-ref-num-one": (["eval", "ref-stats", "--ref-num", "1"], ["--ref-num"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_eval_refuses(scene, userdir, case):
    args, fragments = CASES[case]
    outcome = cli(*args)
    assert_refused(outcome, *fragments)
    assert not (userdir / "new").exists()


def test_data_loss_eval_scores_images_argen_did_not_make(scene, userdir):
    """Issue 9 item 3. Before: 8 white squares in scored/samples/ (no sampling.json) counted as
    "already present", were scored and credited to default-c2i. Now: refused in one line."""
    outcome = cli("eval", "fid", "--model", "default-c2i", "--num-samples", "8", "--out", "scored")
    assert_refused(outcome, "'scored'", "evaluation did not write")
    assert not (userdir / "scored" / "metrics.json").exists()


def test_unrecorded_images_in_an_argen_folder_are_not_counted(tmp_path, monkeypatch, tiny_c2i):
    """A folder argen marked but whose run never recorded sampling.json: its images are no samples."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / ".argen-output.json").write_text(json.dumps({"argen": "0.1.0", "kind": "eval-run"}))
    _white_squares(tmp_path / "e" / "samples", 2)
    outcome = cli("eval", "sample", "--model", tiny_c2i, "--num-samples", "2", "--out", "e", "--threads", "1")
    assert_refused(outcome, "no recorded run")
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [".argen-output.json", "samples"]


# ---- positive controls ---------------------------------------------------------------------------


def test_eval_into_its_own_output_resumes_and_rewrites_its_json(tmp_path, monkeypatch, tiny_c2i):
    import functools

    import argen.progress

    monkeypatch.chdir(tmp_path)
    # stderr is not a terminal here: progress comes as plain lines (every 5 s; every update for the test)
    monkeypatch.setattr(argen.progress, "progress", functools.partial(argen.progress.progress, every=0.0))
    args = ["eval", "fid", "--model", tiny_c2i, "--num-samples", "2", "--batch-size", "2", "--out", "e",
            "--ref-num", "20", "--no-floor", "--threads", "1", "--json", "m.json", "--npz", "s.npz"]
    first = cli(*args)
    assert first.code == 0, first.err
    assert "sampling: 2/2 images" in first.err and "features of 2 samples: 1/1 batches" in first.err
    again = cli(*args)
    assert again.code == 0, again.err
    assert "0 image(s) to generate, 2 already present" in again.err
    assert json.loads((tmp_path / "m.json").read_text())["argen"]  # signed: the re-run could replace it
    assert json.loads((tmp_path / "e" / ".argen-output.json").read_text())["kind"] == "eval-run"
    scored = cli("eval", "fid", "--samples", "e", "--out", "e", "--ref-num", "20", "--no-floor", "--threads", "1")
    assert scored.code == 0, scored.err  # scoring an argen run into its own folder
