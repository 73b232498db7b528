"""Bad inputs to `argen train`: every case exits 2 with one line, before any work, and leaves the
user's files as they were (docs/reliability.md, "argen train")."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_refused, cli

TINY_TOK = ["--limit", "16", "--test-limit", "2", "--batch-size", "8", "--ch", "8", "--ch-mult", "1,1,1,1",
            "--z-channels", "8", "--codebook-size", "32", "--codebook-dim", "4", "--norm-groups", "4",
            "--warmup-steps", "1", "--ckpt-every", "1", "--log-every", "1", "--no-progress", "--threads", "1"]
TOK = ["train", "tokenizer", "--steps", "2"]
GPT = ["train", "gpt", "--model-type", "c2i", "--vq", "default-vq", "--steps", "2"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # a CLI run sets its own


@pytest.fixture
def scene(tmp_path):
    """Files made before the user's folder is snapshotted (request it before `userdir`)."""
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "mycache.safetensors").write_bytes(b"my own tensors")
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "empty").mkdir()
    marker = json.dumps({"argen": "0.1.0", "kind": "train-run"})
    for name, state in (("corrupt", "{not json"), ("incomplete", "{}"), ("truncated", '{"step": 1, "elap')):
        ckpt = tmp_path / name / "checkpoints" / "step_000001"
        ckpt.mkdir(parents=True)
        (tmp_path / name / ".argen-output.json").write_text(marker)
        (ckpt / "state.json").write_text(state)
    return tmp_path


CASES = {
    # --out: a folder with the user's files (item 2 of issue 9), a file, a file on the way
    "out-user-folder-tokenizer": (TOK + ["--out", "run"], ["'run'", "not an argen training run"]),
    "out-user-folder-gpt": (GPT + ["--out", "run"], ["'run'", "not an argen training run"]),
    "out-user-subfolder": (TOK + ["--out", "run/model"], ["not an argen training run"]),
    "out-is-a-file": (TOK + ["--out", "notes.txt"], ["is a file"]),
    "out-below-a-file": (TOK + ["--out", "notes.txt/run"], ["is a file, not a folder"]),
    # numbers
    "threads-negative": (TOK + ["--out", "new", "--threads", "-1"], ["--threads", "[1, 4096]"]),
    "threads-zero": (TOK + ["--out", "new", "--threads", "0"], ["--threads"]),
    "steps-zero": (["train", "tokenizer", "--out", "new", "--steps", "0"], ["--steps", "got 0"]),
    "steps-fraction": (["train", "tokenizer", "--out", "new", "--steps", "2.5"], ["--steps", "integer"]),
    "epochs-nan": (["train", "tokenizer", "--out", "new", "--epochs", "nan"], ["--epochs", "finite"]),
    "epochs-inf": (["train", "gpt", "--model-type", "c2i", "--vq", "default-vq", "--out", "new", "--epochs", "inf"],
                   ["--epochs", "finite"]),
    "lr-nan": (TOK + ["--out", "new", "--lr", "nan"], ["--lr", "finite"]),
    "lr-zero": (TOK + ["--out", "new", "--lr", "0"], ["--lr"]),
    "ema-decay-one": (TOK + ["--out", "new", "--ema-decay", "1"], ["--ema-decay"]),
    "seed-negative": (TOK + ["--out", "new", "--seed", "-1"], ["--seed"]),
    "seed-too-big": (TOK + ["--out", "new", "--seed", str(2**64)], ["--seed"]),
    "batch-size-zero": (GPT + ["--out", "new", "--batch-size", "0"], ["--batch-size"]),
    "limit-one": (GPT + ["--out", "new", "--limit", "1"], ["--limit"]),
    "dropout-one": (GPT + ["--out", "new", "--dropout", "1"], ["--dropout"]),
    # refused before the codes cache is written (item 7)
    "gpt-size-unknown": (GPT + ["--out", "new", "--size", "GPT-ZZ"], ["GPT-ZZ"]),
    "gpt-heads-do-not-divide": (GPT + ["--out", "new", "--dim", "30", "--n-head", "4"], ["not divisible"]),
    # a model whose training state cannot fit in memory: refused before any data is encoded
    "gpt-too-big": (GPT + ["--out", "new", "--dim", "100000000", "--n-layer", "1", "--n-head", "1"],
                    ["this GPT has", "GiB", "smaller model"]),
    "refiner-too-big": (["train", "refiner", "--vq", "default-vq", "--steps", "2", "--out", "new", "--dim", "100000000"],
                        ["this refiner has", "GiB"]),
    "vq-too-big": (TOK + ["--out", "new", "--ch", "1000000", "--threads", "1"], ["this tokenizer has", "GiB"]),
    "flextok-too-big": (TOK + ["--out", "new", "--arch", "flextok", "--width", "10000000", "--threads", "1"],
                        ["this tokenizer has", "GiB"]),
    "codes-cache-not-safetensors": (GPT + ["--out", "new", "--codes-cache", "notes.txt"], [".safetensors"]),
    "codes-cache-a-folder": (GPT + ["--out", "new", "--codes-cache", "folder.safetensors"], ["is a folder"]),
    "codes-cache-user-file": (GPT + ["--out", "new", "--codes-cache", "mycache.safetensors"],
                              ["not a codes cache argen wrote"]),
    # --resume (item 7): nothing there is a typo, not a new run
    "resume-nothing-there": (TOK + ["--out", "new", "--resume"], ["nothing to resume", "'new'"]),
    "resume-empty-folder": (TOK + ["--out", "empty", "--resume"], ["nothing to resume"]),
    "resume-user-folder": (TOK + ["--out", "run", "--resume"], ["not an argen training run"]),
    # a corrupt checkpoint state.json (item 6)
    "resume-corrupt-state": (TOK + ["--out", "corrupt", "--resume"], ["corrupt", "step_000001"]),
    "resume-incomplete-state": (TOK + ["--out", "incomplete", "--resume"], ["corrupt", "lacks"]),
    "resume-truncated-state": (TOK + ["--out", "truncated", "--resume"], ["corrupt"]),
    "checkpoints-without-resume": (TOK + ["--out", "corrupt"], ["--resume"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_refuses(scene, userdir, case):
    args, fragments = CASES[case]
    extra = TINY_TOK if args[1] == "tokenizer" and "--steps" in args and "--threads" not in args else []
    outcome = cli(*args, *extra)
    assert_refused(outcome, *fragments)
    assert not (userdir / "new").exists()


# refused after the training set is read, but before the run folder is claimed (and before a GPT or refiner
# run encodes its codes): until session 40 these left `new/` behind with a marker, train_config.json and the
# codes cache, after the encoding of the whole training set
DATA_CASES = {
    "tokenizer-batch-larger-than-data": (TOK + ["--out", "new", "--threads", "1", "--limit", "4", "--batch-size", "8"],
                                         ["4 items", "fewer than one batch of 8"]),
    "gpt-batch-larger-than-data": (GPT + ["--out", "new", "--limit", "4", "--batch-size", "8"],
                                   ["4 items", "fewer than one batch of 8"]),
    "refiner-batch-larger-than-data": (["train", "refiner", "--vq", "default-vq", "--steps", "2", "--out", "new",
                                        "--limit", "4", "--batch-size", "8"], ["4 items", "fewer than one batch of 8"]),
    "gpt-init-from-not-a-gpt": (GPT + ["--out", "new", "--limit", "4", "--batch-size", "2", "--init-from", "default-vq"],
                                ["holds a VQTokenizer", "not a GPT"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_train_refuses_before_the_run_folder_is_claimed(fmnist_available, userdir, case):
    args, fragments = DATA_CASES[case]
    assert_refused(cli(*args), *fragments)
    assert not (userdir / "new").exists()


def test_data_loss_train_into_a_folder_of_the_users(userdir):
    """Issue 9 item 2. Before: `argen train ... --out run` deleted run/model/MY_NOTES.md (the export
    replaced run/model) and appended training rows to the user's run/log.csv. Now: refused in one
    line before any work; `userdir` checks that every file is unchanged."""
    outcome = cli(*TOK, "--out", "run", *TINY_TOK)
    assert_refused(outcome, "'run'", "not an argen training run")
    assert (userdir / "run" / "log.csv").read_text() == "my,own,log\n"
    assert (userdir / "run" / "model" / "MY_NOTES.md").read_text() == "keep me\n"


# ---- positive controls: what the refusals must not catch ------------------------------------


def test_an_argen_run_resumes_and_a_finished_run_re_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = cli(*TOK, "--out", "r", *TINY_TOK)
    assert first.code == 0, first.err
    assert json.loads((tmp_path / "r" / ".argen-output.json").read_text())["kind"] == "train-run"
    log = (tmp_path / "r" / "log.csv").read_text()
    again = cli(*TOK, "--out", "r", "--resume", *TINY_TOK)  # finished: re-exports the model
    assert again.code == 0, again.err
    assert "resuming from" in again.err and (tmp_path / "r" / "log.csv").read_text() == log
    more = cli("train", "tokenizer", "--steps", "3", "--out", "r", "--resume", *TINY_TOK)
    assert more.code == 2 and "steps=2" in more.err  # other settings: one line, nothing changed


def test_resume_of_an_argen_run_without_checkpoint_starts_at_step_0_with_a_notice(tmp_path, monkeypatch):
    import functools

    import argen.train.common

    monkeypatch.chdir(tmp_path)
    # stderr is not a terminal here: progress comes as plain lines (every 5 s; every step for the test)
    monkeypatch.setattr(argen.train.common, "progress", functools.partial(argen.train.common.progress, every=0.0))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / ".argen-output.json").write_text(json.dumps({"argen": "0.1.0", "kind": "train-run"}))
    outcome = cli(*TOK, "--out", "r", "--resume", *[a for a in TINY_TOK if a != "--no-progress"])
    assert outcome.code == 0, outcome.err
    assert "holds no checkpoint yet; starting at step 0" in outcome.err
    assert "train r from step 0: 2/2 steps" in outcome.err
    assert (tmp_path / "r" / "checkpoints" / "step_000002").is_dir()


def test_a_run_folder_of_an_older_argen_is_adopted(tmp_path, monkeypatch):
    """Runs started before run folders carried a marker still resume (nothing foreign inside)."""
    monkeypatch.chdir(tmp_path)
    assert cli(*TOK, "--out", "r", *TINY_TOK).code == 0
    (tmp_path / "r" / ".argen-output.json").unlink()
    outcome = cli(*TOK, "--out", "r", "--resume", *TINY_TOK)
    assert outcome.code == 0, outcome.err
    assert "resuming from" in outcome.err and (tmp_path / "r" / "model" / "config.json").is_file()
    assert (tmp_path / "r" / ".argen-output.json").is_file()
