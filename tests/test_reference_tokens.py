"""The shipped pipelines sample exactly what they sampled when `tests/data/reference_tokens.json`
was recorded (scripts/record_reference_tokens.py): same tokens and same image bytes, for every
sampler, with a batch size that splits the images unevenly; and so do they with their decode-step
weights oneDNN-packed (`--weights fp32-packed`, fp32 to rounding)."""

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
    expected = RECORD[model]["samplers"][sampler]
    result = pipelines[model](**RECORD[model]["case"], sampler=sampler, seed=11, batch_size=3, progress=False)
    assert result.tokens.tolist() == expected["tokens"]
    pixels = np.stack([np.asarray(im) for im in result.images])
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == expected["images_sha256"]
