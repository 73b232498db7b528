"""Assemble the shipped coarse-to-fine pipeline from a coarse-GPT run and a refiner run.

    python scripts/ship_ctf.py --gpt-run /work/runs-ctf/c2i64 --refiner-run /work/runs-ctf/ref64

Writes `argen/assets/ctf-refiner/` (the refiner, fp16) and `argen/assets/ctf-c2i/` (the coarse GPT,
fp16, and a `pipeline.json` naming `ctf-refiner` and `default-vq` by their shipped names). Each
model is the EMA weights of its run's latest checkpoint: for a finished run that is the final
checkpoint, the weights `model/` exports; for a run still going, its latest step (recorded in
`ship.json`, so the model card says which step shipped). Both folders are replaced: copy their
MODEL_CARD.md / metrics.json / samples.png away first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from argen.data.fashion_mnist import CLASS_NAMES  # noqa: E402
from argen.models.gpt import GPT, GPTConfig  # noqa: E402
from argen.pipeline import pipeline_json  # noqa: E402
from argen.refiners.ctf import CTFRefiner  # noqa: E402
from argen.train.common import latest_checkpoint  # noqa: E402


def _from_run(run: Path, build):
    """(model, source): the EMA weights of the latest checkpoint."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise SystemExit(f"{run}: no checkpoint yet")
    state = json.loads((ckpt / "state.json").read_text())
    model = build(state["run_info"])
    model.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
    return model.eval(), {"checkpoint": str(ckpt), "step": state["step"], "steps": state["train_config"]["steps"],
                          "train_wall_s": round(state["elapsed"], 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gpt-run", required=True)
    p.add_argument("--refiner-run", required=True)
    p.add_argument("--assets", default=str(REPO / "argen" / "assets"))
    p.add_argument("--cfg-scale", type=float, default=3.0, help="default guidance (default-c2i ships 3.0)")
    p.add_argument("--cfg-schedule", choices=("constant", "linear", "cosine"), default="constant",
                   help="default guidance schedule (written to pipeline.json unless constant)")
    args = p.parse_args(argv)
    assets = Path(args.assets)

    ref, ref_src = _from_run(Path(args.refiner_run), lambda info: CTFRefiner(**info["refiner_config"]))
    gpt, gpt_src = _from_run(Path(args.gpt_run), lambda info: GPT(GPTConfig.from_dict(info["gpt_config"])))
    if gpt.vocab_size != ref.in_vocab_size:
        raise SystemExit(f"GPT vocabulary {gpt.vocab_size} != refiner clusters {ref.in_vocab_size}")
    for name in ("ctf-refiner", "ctf-c2i"):  # this script's own output (cards and figures are added by hand)
        shutil.rmtree(assets / name, ignore_errors=True)
    ref.save_pretrained(assets / "ctf-refiner", dtype=torch.float16)
    defaults = {"cfg_scale": args.cfg_scale}
    if args.cfg_schedule != "constant":
        defaults["cfg_schedule"] = args.cfg_schedule
    pipe = pipeline_json(tokenizer="default-vq", class_names=CLASS_NAMES, defaults=defaults,
                         crop=28, refiner="ctf-refiner")
    info = {"generator": gpt_src, "refiner": ref_src, "generator_parameters": gpt.num_parameters(),
            "refiner_parameters": ref.num_parameters()}
    # extra files go through save_pretrained so the folder's marker lists them (a re-ship may replace it)
    gpt.save_pretrained(assets / "ctf-c2i", dtype=torch.float16,
                        extra_files={"pipeline.json": pipe, "ship.json": json.dumps(info, indent=1) + "\n"})
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
