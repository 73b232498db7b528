"""Bad inputs to `argen generate`: every case exits 2 with one line, before any sampling, and
leaves the user's files as they were (docs/reliability.md, "argen generate"). Then the positive
controls: what those checks must keep working."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from argen.atomic import MARKER, is_argen_file
from argen.hub import ASSETS
from conftest import assert_refused, cli, snapshot

GEN = ["generate", "--class", "1", "--num-images", "2", "--out", "new.png"]  # a later --out wins


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Broken copies of default-c2i, outside the user's folder."""
    root = tmp_path_factory.mktemp("models")
    config = json.loads((ASSETS / "default-c2i" / "config.json").read_text())

    def copy(name, **files):
        folder = root / name
        shutil.copytree(ASSETS / "default-c2i", folder)
        for file, text in files.items():
            path = folder / file.replace("_", ".")
            path.unlink()
            if text is not None:
                path.write_text(text)
        return str(folder)

    (root / "empty").mkdir()
    return {
        "empty": str(root / "empty"),
        "corrupt-config": copy("corrupt-config", config_json='{"dim": 256,'),
        "corrupt-pipeline": copy("corrupt-pipeline", pipeline_json="tokenizer: default-vq"),
        "no-tokenizer": copy("no-tokenizer", pipeline_json=None),
        "bad-field": copy("bad-field", config_json=json.dumps({**config, "n_head": 0})),
    }


@pytest.fixture
def scene(tmp_path):
    """The user's files of the data-loss cases, made before `userdir` snapshots (request first)."""
    (tmp_path / "mine").write_text("a file with no extension\n")  # --out mine.png would make it a folder
    (tmp_path / "dir.png").mkdir()  # --out dir.png names a folder
    shared = tmp_path / "shared"  # argen's image folder, where the user then put a file
    shared.mkdir()
    (shared / "0000_seed0.png").write_bytes(b"png")
    (shared / "MY_NOTES.md").write_text("keep me\n")
    (shared / MARKER).write_text(json.dumps({"argen": "0.1.0", "kind": "images", "files": ["0000_seed0.png"]}))
    return tmp_path


# ---- every refusal: exit 2, one line, no file touched -----------------------------------------

CASES = {
    # numbers: NaN / infinity / out of range (item 4)
    "--cfg-scale nan": (GEN + ["--cfg-scale", "nan"], "--cfg-scale", "finite"),
    "--cfg-scale inf": (GEN + ["--cfg-scale", "inf"], "--cfg-scale", "finite"),
    "--cfg-scale -1": (GEN + ["--cfg-scale", "-1"], "--cfg-scale", "[0, 100]"),
    "--temperature nan": (GEN + ["--temperature", "nan"], "--temperature", "finite"),
    "--temperature -1": (GEN + ["--temperature", "-1"], "--temperature"),
    "--top-p nan": (GEN + ["--top-p", "nan"], "--top-p", "finite"),
    "--top-p 0": (GEN + ["--top-p", "0"], "--top-p", "(0, 1]"),
    "--top-p 1.5": (GEN + ["--top-p", "1.5"], "--top-p"),
    "--top-k nan": (GEN + ["--top-k", "nan"], "--top-k", "integer"),
    "--top-k -1": (GEN + ["--top-k", "-1"], "--top-k"),
    "--top-k 2.5": (GEN + ["--top-k", "2.5"], "--top-k", "integer"),
    "--cfg-interval -2": (GEN + ["--cfg-interval", "-2"], "--cfg-interval"),
    "--cfg-interval inf": (GEN + ["--cfg-interval", "inf"], "--cfg-interval"),
    "--num-images 0": (["generate", "--class", "1", "--num-images", "0"], "--num-images"),
    "--num-images 5000": (["generate", "--class", "1", "--num-images", "5000"], "--num-images", "4096"),
    "--batch-size 0": (GEN + ["--batch-size", "0"], "--batch-size"),
    "--grid-scale 2000": (GEN + ["--grid-scale", "2000"], "--grid-scale"),
    "--grid-scale 64 --num-images 4096 (a 13-gigapixel grid)": (
        ["generate", "--class", "1", "--num-images", "4096", "--grid-scale", "64", "--out", "new.png"],
        "--grid-scale", "megapixels"),
    # seeds (item 5)
    "--seed 4294967296 (would give the images of seed 0)": (GEN + ["--seed", "4294967296"], "--seed", "4294967295"),
    "--seed 2**64": (GEN + ["--seed", str(2**64)], "--seed"),
    "--seed -1": (GEN + ["--seed", "-1"], "--seed"),
    "--seed 1.5": (GEN + ["--seed", "1.5"], "--seed", "integer"),
    "--seed 4294967295 --num-images 2 (seed + 1 past the range)": (GEN + ["--seed", "4294967295"], "--seed",
                                                                    "4294967294"),
    # sampler options (item 6)
    "--sampler gsd:G=abc": (GEN + ["--sampler", "gsd:G=abc"], "group_size", "integer"),
    "--sampler sjd:L=nan": (GEN + ["--sampler", "sjd:L=nan"], "window", "finite"),
    "--sampler gsd:G=": (GEN + ["--sampler", "gsd:G="], "no value"),
    "--sampler gsd:foo=1 (unknown option)": (GEN + ["--sampler", "gsd:foo=1"], "no option 'foo'"),
    "--sampler mcsjd:L=0": (GEN + ["--sampler", "mcsjd:L=0"], "window"),
    "--sampler nosuch": (GEN + ["--sampler", "nosuch"], "unknown sampler"),
    "--sampler sjd:init=up": (GEN + ["--sampler", "sjd:init=up"], "init"),
    # devices (item 6)
    "--device cuda (no GPU here)": (GEN + ["--device", "cuda"], "cuda"),
    "--device tpu9": (GEN + ["--device", "tpu9"], "tpu9"),
    "--device meta": (GEN + ["--device", "meta"], "meta"),
    # classes and prompts (items 7, 8)
    "--class nosuchclass": (["generate", "--class", "nosuchclass"], "nosuchclass"),
    "--class 10 (ids are 0..9)": (["generate", "--class", "10"], "0..9"),
    "--class with the text-to-image model": (GEN + ["--model", "default-t2i"], "text-to-image", "prompt"),
    "a prompt and --class": (GEN + ["a bag"], "not both"),
    "neither prompt nor --class": (["generate"], "prompt"),
    "an empty prompt": (["generate", "  "], "empty prompt"),
    # outputs
    "--out x.jpg": (GEN + ["--out", "x.jpg"], "--out", ".png"),
    "--out dir.png (a folder)": (GEN + ["--out", "dir.png"], "dir.png", "folder"),
    "--out notes.txt/x.png (parent is a file)": (GEN + ["--out", "notes.txt/x.png"], "notes.txt", "file"),
    # data loss (item 1): the single images would replace a folder or file argen did not write
    "default --out: ./out.png and ./out/ are the user's": (["generate", "--class", "1"], "out.png", "not written by argen"),
    "--out run.png: ./run/ holds the user's files": (GEN + ["--out", "run.png"], "'run'", "did not write", "--out"),
    "--out out.png: ./out.png is the user's": (GEN + ["--out", "out.png"], "out.png", "not written by argen"),
    "--out mine.png: ./mine is a file": (GEN + ["--out", "mine.png"], "'mine'", "is a file"),
    "--out shared.png: argen's folder with a file of the user's": (GEN + ["--out", "shared.png"], "shared",
                                                                   "did not write"),
}


@pytest.mark.parametrize("case", CASES)
def test_refused(case, scene, userdir):
    args, *fragments = CASES[case]
    assert_refused(cli(*args), *fragments)


MODEL_CASES = {
    "empty --model folder": ("empty", "--model", "no config.json"),
    "corrupt config.json": ("corrupt-config", "--model", "config.json", "not valid json"),
    "corrupt pipeline.json": ("corrupt-pipeline", "--model", "pipeline.json", "not valid json"),
    "no tokenizer recorded": ("no-tokenizer", "--model", "--tokenizer"),
    "config.json with n_head 0 (found while loading)": ("bad-field", "bad-field/config.json", "not describe a gpt"),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_broken_model_folder(case, models, userdir):
    name, *fragments = MODEL_CASES[case]
    assert_refused(cli(*GEN, "--model", models[name]), *fragments)


def test_no_such_model(userdir):
    assert_refused(cli(*GEN, "--model", "nosuchmodel"), "nosuchmodel", "default-c2i")


def test_out_into_the_current_folder(userdir):
    """`cd proj && argen generate --out ../proj.png` emptied proj (item 1)."""
    out = f"../{userdir.name}.png"
    assert_refused(cli(*GEN, "--out", out), "current folder")
    assert not (userdir.parent / f"{userdir.name}.png").exists()


def _quiet(monkeypatch):
    """No progress lines (a loaded CPU can take over 5 s), so stderr holds only the error."""
    import argen.pipeline
    from argen.progress import progress

    monkeypatch.setattr(argen.pipeline, "progress_bar", lambda *a, **k: progress(*a, **{**k, "enabled": False}))


def test_full_disk(userdir, monkeypatch):
    """ENOSPC while writing: one line naming the path; no temporary, no half-written file."""
    def full(self, fp, *args, **kwargs):
        (open(fp, "wb") if isinstance(fp, (str, os.PathLike)) else fp).write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    _quiet(monkeypatch)
    assert_refused(cli(*GEN), "'new'", "no space left")


def test_full_disk_at_the_grid(tmp_path, monkeypatch):
    """The folder is written, then the disk fills while writing the grid: the folder is complete
    (marker and all), no grid, no temporary."""
    real = Image.Image.save

    def full_for_streams(self, fp, *args, **kwargs):
        if not isinstance(fp, (str, os.PathLike)):
            fp.write(b"\x89PNG half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, fp, *args, **kwargs)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Image.Image, "save", full_for_streams)
    _quiet(monkeypatch)
    assert_refused(cli(*GEN), "'new.png'", "no space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [MARKER, "0000_seed0.png", "0001_seed1.png"]


def test_os_error_at_the_cli_boundary(userdir, monkeypatch):
    """Any OSError reaching main() is one line naming the path, exit 2."""
    import argen.cli.generate

    def unwritable(text):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/somewhere/out.png")

    monkeypatch.setattr(argen.cli.generate, "check_outputs", unwritable)
    assert_refused(cli(*GEN), "permission denied", "/somewhere/out.png")


def _run_fresh(*code):
    """A new Python process (nothing imported yet); returns (CPU seconds it used, stdout, stderr).

    CPU time, not wall-clock: on a loaded machine a waiting process is slow without doing more
    work, and what this measures is the work (what gets imported before the refusal)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", "\n".join(code)], capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, proc.stdout, proc.stderr


@pytest.mark.parametrize("args", [["--class", "1", "--cfg-scale", "-1"], ["--class", "nosuchclass"]],
                         ids=["--cfg-scale -1", "--class nosuchclass"])
def test_refused_fast_without_torch(args, tmp_path):
    """item 8: refused in well under 1.5 CPU seconds (was 7.6 s / 8.0 s), torch never imported."""
    seconds, out, err = _run_fresh(
        "import sys",
        "from argen.cli.main import main",
        f"code = main(['generate', *{args!r}])",
        "print(code, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    assert out.split() == ["2", "False", "False"], (out, err)
    assert err.count("\n") == 1 and err.startswith("argen: error:"), err
    assert seconds < 1.5, seconds


def test_cli_modules_import_no_torch():
    _, out, err = _run_fresh("import sys", "import argen.cli.main as m", "m.build_parser()",
                             "print(sorted(n for n in ('torch', 'diffusers', 'transformers') if n in sys.modules))")
    assert out.strip() == "[]", (out, err)


# ---- positive controls ------------------------------------------------------------------------


def test_rerun_into_its_own_outputs(tmp_path, monkeypatch):
    """Re-running replaces argen's own grid and folder (and only those); the largest seed works."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine\n")
    first = cli("generate", "--class", "1", "--num-images", "1", "--seed", "4294967295")  # default --out out.png
    assert first.code == 0, first.err
    assert is_argen_file(tmp_path / "out.png")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "0000_seed4294967295.png"]
    second = cli(*GEN, "--out", "out.png")
    assert second.code == 0, second.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "0000_seed0.png", "0001_seed1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "out", "out.png"]  # no temporaries


def test_out_into_new_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outcome = cli(*GEN, "--num-images", "1", "--out", "new/dir/x.png")
    assert outcome.code == 0, outcome.err
    assert is_argen_file(tmp_path / "new/dir/x.png") and (tmp_path / "new/dir/x" / MARKER).is_file()


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path, monkeypatch):
    """item 7: a generate killed while writing left `.out.argen-tmp-PID-*`; the next run in that
    folder removes it (its process is gone), and leaves a live writer's temporaries alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_dir = tmp_path / f".out.argen-tmp-{dead.pid}-abc"
    stale_dir.mkdir()
    (stale_dir / "0000_seed0.png").write_bytes(b"half")
    stale_file = tmp_path / f".out.png.argen-tmp-{dead.pid}-xyz.tmp"
    stale_file.write_bytes(b"half")
    live = tmp_path / f".out.argen-tmp-{os.getpid()}-live"
    live.mkdir()
    monkeypatch.chdir(tmp_path)
    outcome = cli(*GEN, "--num-images", "1", "--out", "out.png")
    assert outcome.code == 0, outcome.err
    assert not stale_dir.exists() and not stale_file.exists() and live.exists()


def test_mcsjd_huge_window_is_capped(tmp_path, monkeypatch):
    """item 7: mcsjd:L=100000 runs as L=64 (the image length): same images, and its per-step
    state is [B, 63, V], not [B, 99999, V] (26 s for 2 images before; L=10**7 wanted 82 GB)."""
    from argen.samplers.speculative import SpeculativeSampler

    windows = []
    start = SpeculativeSampler.start

    def spy(self, probs, streams, num_tokens, grid, window=None):
        win = start(self, probs, streams, num_tokens, grid, window)
        windows.append(win.q.shape[1] + 1)
        return win

    monkeypatch.setattr(SpeculativeSampler, "start", spy)
    monkeypatch.chdir(tmp_path)
    assert cli(*GEN, "--num-images", "1", "--sampler", "mcsjd:L=64", "--out", "a.png").code == 0
    assert cli(*GEN, "--num-images", "1", "--sampler", "mcsjd:L=100000", "--out", "b.png").code == 0
    assert windows == [64, 64]
    name = "0000_seed0.png"
    assert Image.open(tmp_path / "a" / name).tobytes() == Image.open(tmp_path / "b" / name).tobytes()


def test_class_names_synonyms_and_ids_still_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outcome = cli("generate", "--class", "sneakers", "--class", "0", "--num-images", "1", "--grid-scale", "1")
    assert outcome.code == 0, outcome.err
    assert sorted(p.name for p in Path("out").iterdir()) == [MARKER, "0000_seed0.png", "0001_seed1.png"]


def test_help_explains_counts_and_sentinels():
    outcome = cli("generate", "--help")
    text = " ".join(outcome.out.split())
    assert outcome.code == 0
    for fragment in ("images per class or per prompt", "-1 (default) guides every token",
                     "0 (default) keeps all", "1.0 (default) keeps all", "replaced only if argen wrote it"):
        assert fragment in text, fragment


def test_refusals_leave_snapshot_helper_honest(tmp_path):
    """The snapshot sees hidden files and modes (what the data-loss cases rely on)."""
    (tmp_path / ".hidden").write_text("x")
    before = snapshot(tmp_path)
    os.chmod(tmp_path / ".hidden", 0o600)
    assert snapshot(tmp_path) != before
