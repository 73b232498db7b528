"""The `argen` command: help, version, one-line errors with exit code 2."""

import json
import subprocess
import sys


from argen import __version__
from argen.cli.main import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "argen", *args], capture_output=True, text=True, timeout=120)


def test_version_and_help():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"argen {__version__}"
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("generate", "bench", "eval", "train"):
        assert command in out.stdout


def test_unknown_command_is_one_line_exit_2():
    out = run_cli("fly")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "invalid choice" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_option_is_one_line(capsys):
    assert main(["--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("argen: error:") and err.strip().count("\n") == 0


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    from argen.atomic import atomic_write, atomic_write_json

    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}

    def broken(handle):
        handle.write(b"half")
        raise RuntimeError("killed mid-write")

    try:
        atomic_write(target, broken)
    except RuntimeError:
        pass
    assert json.loads(target.read_text()) == {"a": 1}  # the old file is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # no temporary left


def test_cli_weight_formats_mirror_the_model_ones():
    """The CLI keeps its own copy (no torch import before argument checks); they must agree."""
    from argen.cli.checked import AUTO_PACK_MB, WEIGHT_CHOICES, WEIGHT_FORMATS
    from argen.models.quant import AUTO_PACK_BYTES
    from argen.models.quant import WEIGHT_CHOICES as MODEL_CHOICES
    from argen.models.quant import WEIGHT_FORMATS as MODEL_FORMATS

    assert WEIGHT_FORMATS == MODEL_FORMATS and WEIGHT_CHOICES == MODEL_CHOICES
    assert AUTO_PACK_MB * 2**20 == AUTO_PACK_BYTES


def test_cli_choice_mirrors_match_the_library():
    from argen.cli.checked import CFG_SCHEDULES, COMPILE_MODES, NESTED_DROPOUT_MODES
    from argen.models.base import COMPILE_MODES as LIBRARY_COMPILE_MODES
    from argen.samplers.logits import CFG_SCHEDULES as LIBRARY_SCHEDULES
    from argen.tokenizers.flextok import NESTED_DROPOUT_MODES as LIBRARY_MODES

    assert CFG_SCHEDULES == tuple(LIBRARY_SCHEDULES) and NESTED_DROPOUT_MODES == LIBRARY_MODES
    assert COMPILE_MODES == LIBRARY_COMPILE_MODES


# ---- bad input found by a CLI audit: each was a traceback, a wrong exit code, work before the refusal,
# or a user's file replaced ---------------------------------------------------------------------------

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The current folder, with a file and a JSON of the user's; torch's thread count restored after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ARGEN_CACHE", str(tmp_path / ".cache"))
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "results.json").write_text('{"mine": true}\n')
    (tmp_path / "one.jsonl").write_text('{"prompt": "a plain white tee", "label": "T-shirt/top"}\n')
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9 dress\n".encode("latin-1"))
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


def _refused(capsys, argv, *fragments):
    """Exit 2 and one line on stderr naming every fragment (an exception escaping main fails the test)."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("argen: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


PROMPTS = ["eval", "prompts", "--prompts", "one.jsonl", "--num-images", "1"]


@pytest.mark.parametrize("argv, fragments", [
    # --json was written after the run without any check: the user's file replaced, a .txt overwritten
    (PROMPTS + ["--threads", "1", "--json", "results.json"], ["'results.json'", "not written by argen"]),
    (PROMPTS + ["--threads", "1", "--json", "notes.txt"], ["--json", ".json"]),
    # plain int/float types: torch.set_num_threads(-1) was a RuntimeError traceback
    (PROMPTS + ["--threads", "-1"], ["--threads"]),
    (PROMPTS + ["--threads", "1", "--cfg-scale", "nan"], ["--cfg-scale", "finite"]),
], ids=["json-user-file", "json-not-json", "threads-negative", "cfg-scale-nan"])
def test_eval_prompts_checks_its_arguments_first(workdir, capsys, argv, fragments):
    _refused(capsys, argv, *fragments)
    assert (workdir / "results.json").read_text() == '{"mine": true}\n'
    assert (workdir / "notes.txt").read_text() == "my notes\n"


@pytest.mark.parametrize("argv", [
    ["eval", "ref-stats", "--ref-num", "20", "--threads", "1", "--device", "tpu9"],
    ["eval", "fid", "--model", "default-c2i", "--num-samples", "2", "--out", "new", "--threads", "1",
     "--device", "cuda:7"],
], ids=["ref-stats-tpu9", "fid-cuda7"])
def test_eval_device_is_checked(workdir, capsys, argv):
    """Was torch's RuntimeError traceback ("Invalid device string", "Found no NVIDIA driver")."""
    _refused(capsys, argv, "device")
    assert not (workdir / "new").exists()


@pytest.mark.parametrize("extra, fragments", [
    (["--ref", "nosuch"], ["unknown reference 'nosuch'"]),
    (["--subsets", "3"], ["--subsets 3", "need at least 2"]),
], ids=["ref-typo", "subsets-too-many"])
def test_eval_fid_refuses_before_sampling(workdir, capsys, extra, fragments):
    """Was refused only after every sample was drawn and written (hours, in a real run)."""
    _refused(capsys, ["eval", "fid", "--model", "default-c2i", "--num-samples", "4", "--batch-size", "4",
                      "--out", "new", "--threads", "1", "--no-floor", *extra], *fragments)
    assert not (workdir / "new").exists()


def test_prompt_file_that_is_not_utf8(workdir, capsys):
    """Was a UnicodeDecodeError traceback."""
    _refused(capsys, ["eval", "sample", "--model", "default-t2i", "--num-samples", "2", "--out", "new",
                      "--threads", "1", "--prompts", "latin1.txt"], "latin1.txt", "UTF-8")


@pytest.mark.parametrize("argv, fragments", [
    # a zero or negative width reached torch (RuntimeError traceback, a run folder left behind)
    (["train", "tokenizer", "--ch-mult", "0,1"], ["--ch-mult", "positive"]),
    # _int_tuple's own message was swallowed by argparse: "invalid _int_tuple value"
    (["train", "tokenizer", "--ch-mult", "1,a"], ["--ch-mult", "comma-separated integers"]),
    # plain int: 0 or -5 accepted (c2i) or refused after the codes cache was built (t2i)
    (["train", "gpt", "--model-type", "t2i", "--vq", "default-vq", "--text-max-length", "0"],
     ["--text-max-length"]),
    # silently ignored without a teacher
    (["train", "gpt", "--model-type", "c2i", "--vq", "default-vq", "--distill-cfg", "2"], ["--distill-from"]),
    # refused only after the codes cache was written
    (["train", "gpt", "--model-type", "c2i", "--vq", "default-vq", "--init-from", "nosuch"], ["nosuch"]),
], ids=["ch-mult-zero", "ch-mult-letter", "text-max-length-zero", "distill-cfg-alone", "init-from-missing"])
def test_train_refuses_before_any_work(workdir, capsys, argv, fragments):
    line = _refused(capsys, [*argv, "--steps", "1", "--out", "run", "--threads", "1", "--limit", "4",
                             "--batch-size", "2", "--no-progress"], *fragments)
    assert "_int_tuple" not in line
    assert not (workdir / "run").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--model", ""], "empty model name"),  # fell back to default-c2i
    (["--tokenizer", ""], "empty model name"),  # loaded the pipeline's own folder as its tokenizer
])
def test_generate_refuses_an_empty_name(workdir, capsys, argv, fragment):
    _refused(capsys, ["generate", *argv, "--class", "sneaker", "--num-images", "1", "--out", "x.png"], fragment)
    assert not (workdir / "x.png").exists()


def test_bench_list_values_are_bounded(workdir, capsys):
    """--batch-sizes 99999999999999999999 was an OverflowError traceback after the model loaded."""
    _refused(capsys, ["bench", "decode", "--model", "default-c2i", "--variants", "fp32", "--rounds", "1",
                      "--agreement-tokens", "0", "--threads", "1", "--batch-sizes", "99999999999999999999"],
             "--batch-sizes", "at most 4096")


@pytest.mark.parametrize("spec, fragment", [("gsd:G=3,G=4", "'G' is given twice"),
                                            ("gsd:G=3,group_size=4", "group_size twice")])
def test_sampler_option_given_twice(workdir, capsys, spec, fragment):
    """The last value silently won (and the recorded label named both)."""
    _refused(capsys, ["generate", "--class", "1", "--num-images", "1", "--out", "new.png", "--sampler", spec],
             fragment)
    assert not (workdir / "new.png").exists()


def test_generate_imports_its_libraries_with_the_collector_paused_then_frozen(tmp_path):
    """`argen generate` imports torch, diffusers and the pipeline through `import_libraries`: their objects end up
    frozen (no collection walks them again, at exit neither) and the collector runs again for the sampling."""
    probe = ("import gc, sys\n"
             "from argen.cli.main import main\n"
             f"code = main(['generate', '--model', 'default-c2i', '--class', 'sneaker', '--num-images', '1', "
             f"'--out', {str(tmp_path / 'grid.png')!r}])\n"
             "print(code, gc.isenabled(), gc.get_freeze_count())\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    code, collecting, frozen = out.stdout.split()[-3:]
    assert code == "0" and collecting == "True"
    assert int(frozen) > 200_000  # torch and diffusers alone make about 500,000 objects
    assert (tmp_path / "grid.png").exists()


def test_import_libraries_leaves_a_paused_collector_paused():
    probe = ("import gc\nfrom argen.cli.startup import import_libraries\n"
             "gc.disable(); import_libraries(); print(gc.isenabled(), gc.get_freeze_count() > 200_000)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["False", "True"]
