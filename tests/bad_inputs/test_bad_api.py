"""Bad inputs to the Python API (`ARPipeline`, `SamplingParams`, samplers, `get_sampler`): each
raises a one-line `ArgenError` naming the argument, and touches none of the user's files
(docs/reliability.md, "Python API")."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from argen.errors import ArgenError
from argen.hub import ASSETS
from argen.pipeline import ARPipeline
from argen.samplers import (ARSampler, GSDSampler, MCSJDSampler, SamplingParams, SJDSampler, get_sampler)

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def pipe():
    return ARPipeline.from_pretrained("default-c2i")


def refused(call, *fragments):
    """`call()` raises ArgenError with a single-line message holding every fragment."""
    with pytest.raises(ArgenError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.strip(), message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (fragment, message)
    return message


# ---- numbers: NaN, infinity, out of range (item 4) -------------------------------------------

PARAMS = {
    "cfg_scale=nan": (dict(cfg_scale=NAN), "cfg_scale", "finite"),
    "cfg_scale=inf": (dict(cfg_scale=INF), "cfg_scale", "finite"),
    "cfg_scale=-1": (dict(cfg_scale=-1), "cfg_scale"),
    "cfg_scale=1e6": (dict(cfg_scale=1e6), "cfg_scale", "100"),
    "temperature=nan": (dict(temperature=NAN), "temperature", "finite"),
    "temperature=-inf": (dict(temperature=-INF), "temperature", "finite"),
    "top_p=nan": (dict(top_p=NAN), "top_p", "finite"),
    "top_p=0": (dict(top_p=0.0), "top_p", "(0, 1]"),
    "top_k=nan": (dict(top_k=NAN), "top_k"),
    "top_k=1.5": (dict(top_k=1.5), "top_k", "integer"),
    "top_k=True": (dict(top_k=True), "top_k"),
    "cfg_interval=-2": (dict(cfg_interval=-2), "cfg_interval"),
    "cfg_interval=nan": (dict(cfg_interval=NAN), "cfg_interval"),
}


@pytest.mark.parametrize("case", PARAMS)
def test_sampling_params_refuse(case, userdir):
    kwargs, *fragments = PARAMS[case]
    refused(lambda: SamplingParams(**kwargs), *fragments)


@pytest.mark.parametrize("case", ["cfg_scale=nan", "cfg_scale=inf", "temperature=nan", "top_p=nan", "top_k=nan"])
def test_pipeline_call_refuses_non_finite(case, pipe, userdir):
    kwargs, *fragments = PARAMS[case]
    refused(lambda: pipe(class_labels=1, progress=False, **kwargs), *fragments)


CALLS = {
    "seed=1.5": (dict(seed=1.5), "seed", "integer"),
    "seed=True": (dict(seed=True), "seed"),
    "seed=-1": (dict(seed=-1), "seed"),
    "seed=2**32 (would repeat seed 0)": (dict(seed=2**32), "seed", "4294967295"),
    "seed=2**64": (dict(seed=2**64), "seed"),
    "seed=2**32-1 with 2 images": (dict(seed=2**32 - 1, num_images=2), "seed", "4294967294"),
    "num_images=0": (dict(num_images=0), "num_images"),
    "num_images=1.5": (dict(num_images=1.5), "num_images", "integer"),
    "batch_size=0": (dict(batch_size=0), "batch_size"),
    "batch_size=nan": (dict(batch_size=NAN), "batch_size", "finite"),
    "class_labels=True": (dict(class_labels=True), "class"),
    "class_labels=[True]": (dict(class_labels=[True]), "class"),
    "class_labels=1.0 tensor": (dict(class_labels=torch.tensor([1.0])), "class_labels", "integer"),
    "class_labels=2-D tensor": (dict(class_labels=torch.ones(2, 2, dtype=torch.long)), "class_labels", "1-D"),
    "class_labels=[10] (out of range)": (dict(class_labels=[10]), "0..9"),
    "class_labels='nosuchclass'": (dict(class_labels="nosuchclass"), "unknown"),
    "sampler=3": (dict(sampler=3), "sampler"),
    "sampler='gsd:G=abc'": (dict(sampler="gsd:G=abc"), "group_size", "integer"),
}


@pytest.mark.parametrize("case", CALLS)
def test_pipeline_call_refuses(case, pipe, userdir):
    kwargs, *fragments = CALLS[case]
    kwargs = {"class_labels": 1, **kwargs}
    refused(lambda: pipe(progress=False, **kwargs), *fragments)


# ---- samplers and their options (items 4, 6) -------------------------------------------------

SAMPLERS = {
    "get_sampler('gsd:G=abc')": (lambda: get_sampler("gsd:G=abc"), "group_size", "integer"),
    "get_sampler('sjd:L=nan')": (lambda: get_sampler("sjd:L=nan"), "window", "finite"),
    "get_sampler('gsd:G=')": (lambda: get_sampler("gsd:G="), "no value"),
    "get_sampler('gsd:foo=1') (unknown option)": (lambda: get_sampler("gsd:foo=1"), "foo", "group_size"),
    "get_sampler('mcsjd:L=0')": (lambda: get_sampler("mcsjd:L=0"), "window"),
    "get_sampler('nosuch')": (lambda: get_sampler("nosuch"), "unknown sampler"),
    "get_sampler(3)": (lambda: get_sampler(3), "sampler"),
    "get_sampler('sjd', window=nan)": (lambda: get_sampler("sjd", window=NAN), "window", "finite"),
    "get_sampler('gsd', group_size=inf)": (lambda: get_sampler("gsd", group_size=INF), "group_size", "finite"),
    "SJDSampler(window=0)": (lambda: SJDSampler(window=0), "window"),
    "MCSJDSampler(window=nan)": (lambda: MCSJDSampler(window=NAN), "window", "finite"),
    "GSDSampler(group_size='abc')": (lambda: GSDSampler(group_size="abc"), "group_size"),
    "GSDSampler(prob_threshold=nan)": (lambda: GSDSampler(prob_threshold=NAN), "prob_threshold", "finite"),
    "GSDSampler(embed_quantile=inf)": (lambda: GSDSampler(embed_quantile=INF), "embed_quantile", "finite"),
    "SJDSampler(init='up')": (lambda: SJDSampler(init="up"), "init"),
    "ARSampler(sample='yes')": (lambda: ARSampler(sample="yes"), "sample"),
}


@pytest.mark.parametrize("case", SAMPLERS)
def test_sampler_options_refused(case, userdir):
    call, *fragments = SAMPLERS[case]
    refused(call, *fragments)


def test_sampler_seed_past_32_bits_refused(pipe, userdir):
    """A CPU generator keeps 32 bits of a seed: 2**32 would silently draw what seed 0 draws."""
    cond = torch.tensor([1])
    refused(lambda: ARSampler()(pipe.generator, cond, seeds=[2**32]), "seed", "4294967295")


# ---- loading (items 6, 7) --------------------------------------------------------------------


@pytest.fixture
def model_copy(tmp_path_factory):
    """A copy of default-c2i outside the user's folder, to break."""
    folder = tmp_path_factory.mktemp("models") / "model"
    shutil.copytree(ASSETS / "default-c2i", folder)
    return folder


def _empty(folder):
    shutil.rmtree(folder)
    folder.mkdir()


BROKEN = {
    "empty model folder": (_empty, "no config.json"),
    "corrupt config.json": (lambda f: (f / "config.json").write_text('{"dim": 25'), "config.json", "not valid json"),
    "config.json a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json", "json object"),
    "corrupt pipeline.json": (lambda f: (f / "pipeline.json").write_bytes(b"\x00\xffgarbage"), "pipeline.json",
                              "not valid json"),
    "config.json with a bad field": (lambda f: (f / "config.json").write_text(json.dumps(
        {**json.loads((ASSETS / "default-c2i" / "config.json").read_text()), "n_head": 0})), "config.json", "gpt"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_from_pretrained_broken_folder(case, model_copy, userdir):
    breaker, *fragments = BROKEN[case]
    breaker(model_copy)
    refused(lambda: ARPipeline.from_pretrained(model_copy), *fragments)


@pytest.mark.parametrize("device", ["cuda", "tpu9", "meta"])
def test_from_pretrained_bad_device(device, userdir):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    refused(lambda: ARPipeline.from_pretrained("default-c2i", device=device), "device", device)


# ---- positive controls: what the checks must not refuse --------------------------------------


def test_tensor_and_array_of_class_ids_work(pipe, userdir):
    """item 7: a tensor of valid class ids is not an 'unknown class'."""
    expected = pipe(class_labels=[3, 7], num_images=1, progress=False).tokens
    for labels in (torch.tensor([3, 7]), np.array([3, 7]), [torch.tensor(3).item(), np.int64(7)]):
        assert torch.equal(pipe(class_labels=labels, num_images=1, progress=False).tokens, expected)
    assert pipe(class_labels=torch.tensor(3), num_images=1, progress=False).labels == [3]


def test_largest_seed_works_and_numpy_numbers_pass(pipe, userdir):
    out = pipe(class_labels=1, seed=np.int64(2**32 - 1), cfg_scale=np.float32(2.0), top_k=np.int64(50),
               progress=False)
    assert out.seeds == [2**32 - 1]


def test_mcsjd_window_capped_at_image_length(pipe, userdir):
    """item 7: L=10,000,000 no longer allocates [B, L, V] (82 GB, a MemoryError); it runs as
    L = image length: the same samples and the same forward passes."""
    n = pipe.generator.num_positions
    ref = pipe(class_labels=[1, 7], sampler=f"mcsjd:L={n}", progress=False)
    big = pipe(class_labels=[1, 7], sampler="mcsjd:L=10000000", progress=False)
    assert torch.equal(big.tokens, ref.tokens) and big.num_forward_passes == ref.num_forward_passes


def test_progress_lines_when_not_a_terminal(pipe, monkeypatch, capsys):
    """item 8: a log (stderr not a terminal) gets plain progress lines, not one redrawn bar."""
    import functools

    import argen.pipeline
    from argen.progress import progress

    monkeypatch.setattr(argen.pipeline, "progress_bar", functools.partial(progress, every=0.0))
    pipe(class_labels=1, num_images=2, batch_size=1)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("generating")]
    assert lines and "2/2 images" in lines[-1], lines
