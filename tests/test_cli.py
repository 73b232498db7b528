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
