"""The shipped pipelines sample exactly what they sampled when `tests/data/reference_tokens.json`
was recorded (scripts/record_reference_tokens.py): same tokens and same image bytes, for every
sampler, with a batch size that splits the images unevenly; and so do they with their decode-step
weights oneDNN-packed (`--weights fp32-packed`, fp32 to rounding).

A case may hold alternatives, each recorded on another kind of CPU with the same code and weights
(`--this-cpu`): float32 rounding differs between instruction sets, and on rare seeds that flips one
accept/reject decision of a speculative sampler. A sample must equal one of the recorded ones."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from argen.pipeline import ARPipeline

RECORD = json.loads((Path(__file__).parent / "data" / "reference_tokens.json").read_text())
CASES = [(model, sampler) for model, entry in RECORD.items() for sampler in entry["samplers"]]


@pytest.fixture(scope="module", params=["fp32", "fp32-packed"])
def pipelines(request):
    return {model: ARPipeline.from_pretrained(model, weights=request.param) for model in RECORD}


@pytest.mark.parametrize("model,sampler", CASES)
def test_shipped_samples_unchanged(pipelines, model, sampler):
    entry = RECORD[model]["samplers"][sampler]
    recorded = [entry] + entry.get("alternatives", [])
    result = pipelines[model](**RECORD[model]["case"], sampler=sampler, seed=11, batch_size=3, progress=False)
    matches = [r for r in recorded if r["tokens"] == result.tokens.tolist()]
    assert matches, f"tokens differ from all {len(recorded)} recorded sample(s)"
    pixels = np.stack([np.asarray(im) for im in result.images])
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == matches[0]["images_sha256"]
