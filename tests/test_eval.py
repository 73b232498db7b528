"""argen.eval end to end: extractors (Inception with random weights), ADM npz files, reference
statistics, resumable / multi-process sampling and `argen eval` (one-line errors, exit 2)."""

import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from argen.cli.main import main
from argen.data.fashion_mnist import CLASS_NAMES
from argen.errors import ArgenError, DatasetError
from argen.eval import frechet_distance, feature_statistics
from argen.eval.features import (FMNISTExtractor, InceptionExtractor, as_uint8_images, get_extractor,
                                 write_random_inception_weights)
from argen.eval.npz import read_sample_npz, read_stats_npz, write_sample_npz, write_stats_npz
from argen.eval.quality import evaluate_samples, fid_to_stats, quality_scorer
from argen.eval.reference import reference_stats
from argen.eval.sampling import default_prompts, generate_samples, read_plan, read_prompt_file
from argen.pipeline import ARPipeline
from argen.samplers import SamplingParams
from argen.tokenizers import VQTokenizer

from helpers import launch_two_processes, tiny_gpt



@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_private_cache(tmp_path_factory):
    """Reference statistics go to a private cache; torch uses one thread (shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("argen_cache")
    with mock.patch.dict(os.environ, {"ARGEN_CACHE": str(cache)}):
        os.environ.pop("ARGEN_INCEPTION_WEIGHTS", None)
        yield cache
    torch.set_num_threads(threads)




def tiny_vq32():
    """32x32 grayscale (what the fmnist extractor scores), 4x4 = 16 tokens."""
    torch.manual_seed(0)
    return VQTokenizer(codebook_size=64, codebook_embed_dim=8, ch=32, z_channels=32, encoder_ch_mult=(1, 2, 2, 2),
                       decoder_ch_mult=(1, 2, 2, 2), num_res_blocks=1, in_channels=1, image_size=32).eval()


@pytest.fixture(scope="module")
def c2i_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipes") / "c2i"
    ARPipeline(tiny_gpt(), tiny_vq32(), class_names=CLASS_NAMES, defaults={"cfg_scale": 2.0}).save_pretrained(path)
    return path


def random_images(n, size=32, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_pngs(folder, images, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"{start + i:06d}.png")
    return folder


def png_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- Inception (random weights)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised state dict in torch-fidelity's Inception layout (the real file's format)."""
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "weights-inception-random.pth")


@pytest.fixture(scope="module")
def fake_torchscript(tmp_path_factory):
    """A TorchScript file shaped like clean-fid's inception-2015-12-05.pt (a `layers` module -> 2048)."""

    class FakeInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.AvgPool2d(23), torch.nn.Conv2d(3, 2048, 1), torch.nn.ReLU(),
                                              torch.nn.AdaptiveAvgPool2d(1))

        def forward(self, x, return_features: bool = False):
            return self.layers(x)

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(FakeInception()), str(path))
    return path


def test_inception_adm_matches_torchmetrics_and_torch_fidelity(inception_weights):
    from torchmetrics.image.fid import NoTrainInceptionV3

    images = random_images(3, 32)  # grayscale 32x32, replicated to RGB
    ext = InceptionExtractor(inception_weights, protocol="adm")
    feats, probs = ext.extract(images)
    assert feats.shape == (3, 2048) and feats.dtype == np.float64 and probs.shape == (3, 1008)
    assert np.allclose(probs.sum(axis=1), 1.0) and feats.std(axis=0).mean() > 1e-3  # images differ
    assert ext.identity()["weights_sha256"] == __import__("hashlib").sha256(inception_weights.read_bytes()).hexdigest()

    # torchmetrics with antialias=False runs torch-fidelity's TF1 resize: the ADM protocol.
    tm = NoTrainInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], str(inception_weights), antialias=False)
    rgb = torch.from_numpy(np.repeat(images[..., None], 3, axis=-1)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        tm_feats, tm_logits = tm._torch_fidelity_forward(rgb)
    np.testing.assert_allclose(feats, tm_feats.double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs, torch.softmax(tm_logits.double(), -1).numpy(), rtol=1e-5, atol=1e-9)

    # "torch-fidelity" is the same protocol; the environment variable names the file too.
    with mock.patch.dict(os.environ, {"ARGEN_INCEPTION_WEIGHTS": str(inception_weights)}):
        same = get_extractor("inception", protocol="torch-fidelity")
    assert same.protocol == "adm" and same.key == ext.key
    np.testing.assert_array_equal(same.features(images[:1]), feats[:1])


def test_inception_clean_protocol_is_a_different_metric(inception_weights, fake_torchscript):
    images = random_images(2, 32, channels=3, seed=1)
    adm = InceptionExtractor(inception_weights, protocol="adm").features(images)
    clean = InceptionExtractor(inception_weights, protocol="clean")
    f, p = clean.extract(images)
    assert f.shape == (2, 2048) and p.shape == (2, 1008) and not np.allclose(f, adm)
    assert clean.key != InceptionExtractor(inception_weights, protocol="adm").key  # never share cached stats

    script = InceptionExtractor(fake_torchscript, protocol="clean")
    f2, p2 = script.extract(images)
    assert f2.shape == (2, 2048) and p2 is None and script.identity()["weights_format"] == "torchscript"
    with pytest.raises(ArgenError, match="protocol 'clean' only"):
        InceptionExtractor(fake_torchscript, protocol="adm")


def test_inception_weights_errors(tmp_path):
    with pytest.raises(ArgenError, match="--inception-weights PATH or set ARGEN_INCEPTION_WEIGHTS"):
        InceptionExtractor(None)
    missing = tmp_path / "nope.pth"
    with pytest.raises(ArgenError, match=f"{missing}.*not found"):
        InceptionExtractor(missing)
    with mock.patch.dict(os.environ, {"ARGEN_INCEPTION_WEIGHTS": str(missing)}):
        with pytest.raises(ArgenError, match=r"\$ARGEN_INCEPTION_WEIGHTS"):
            get_extractor("inception")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ArgenError, match="not a readable PyTorch state dict"):
        InceptionExtractor(junk)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(10, 128)}, wrong)
    with pytest.raises(ArgenError, match="not the 2015 TF-Inception"):
        InceptionExtractor(wrong)
    with pytest.raises(ArgenError, match="unknown Inception protocol"):
        InceptionExtractor(wrong, protocol="tf2")


def test_cli_inception_fid_on_folders(tmp_path, capsys, inception_weights):
    samples = write_pngs(tmp_path / "samples", random_images(3, 32, seed=2))
    ref = write_pngs(tmp_path / "ref", random_images(3, 32, seed=3))
    code, out, err = run_main(capsys, "eval", "fid", "--samples", str(samples), "--ref", str(ref), "--extractor",
                              "inception", "--inception-weights", str(inception_weights), "--out", str(tmp_path / "o"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["extractor"]["extractor"] == "inception" and metrics["extractor"]["protocol"] == "adm"
    assert metrics["fid"] > 0 and metrics["num_samples"] == 3 and metrics["class_accuracy"] is None
    assert metrics["extractor"]["weights_sha256"][:16] in out
    # The cached reference statistics now say "inception": the fmnist extractor refuses them.
    cached = next(Path(os.environ["ARGEN_CACHE"]).glob("ref_stats/inception-adm-*.npz"))
    code, out, err = run_main(capsys, "eval", "fid", "--samples", str(samples), "--ref", str(cached))
    assert code == 2 and "2048-d features but the fmnist extractor gives 128-d" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- npz + folders + references


def test_adm_npz_roundtrip(tmp_path):
    gray = random_images(4, 8)
    path = write_sample_npz(tmp_path / "s.npz", gray)
    arr = read_sample_npz(path)
    assert arr.shape == (4, 8, 8, 3) and arr.dtype == np.uint8 and np.array_equal(arr[..., 1], gray)
    with np.load(path) as data:
        assert data.files == ["arr_0"]  # exactly what the ADM evaluator reads

    feats = np.random.default_rng(0).normal(size=(20, 5))
    mu, sigma = feature_statistics(feats)
    meta = {"dataset": "x", "n": 20, "identity": {"extractor": "fmnist"}}
    stats = read_stats_npz(write_stats_npz(tmp_path / "r.npz", mu, sigma, meta=meta, feats=feats))
    assert np.array_equal(stats["mu"], mu) and np.array_equal(stats["sigma"], sigma) and stats["meta"] == meta
    # ADM reference batch: arr_0 only (the evaluator would demand mu_s/sigma_s next to mu).
    adm = write_stats_npz(tmp_path / "adm.npz", mu, sigma, images=gray)
    with np.load(adm) as data:
        assert data.files == ["arr_0"]
    with pytest.raises(ArgenError, match="no 'arr_0'"):
        read_sample_npz(tmp_path / "r.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ArgenError, match="not a readable .npz"):
        read_sample_npz(tmp_path / "bad.npz")


def test_uint8_inputs_and_pil_lists():
    pil = [Image.fromarray(a) for a in random_images(2, 8)]
    assert as_uint8_images(pil).shape == (2, 8, 8, 1)
    with pytest.raises(ArgenError, match="mix sizes or modes"):
        as_uint8_images(pil + [Image.new("L", (9, 8))])
    with pytest.raises(ArgenError, match="mode RGBA"):
        as_uint8_images([Image.new("RGBA", (8, 8))])
    with pytest.raises(ArgenError, match="uint8"):
        as_uint8_images(np.zeros((2, 8, 8), dtype=np.float32))
    with pytest.raises(ArgenError, match="mix shapes"):
        as_uint8_images([np.zeros((8, 8), np.uint8), np.zeros((9, 8), np.uint8)])


def test_fid_to_stats_matches_frechet_distance():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 40)) * 1.5 + 0.3
    mu, sigma = feature_statistics(ref)
    for n in (3, 20, 40, 100):
        x = rng.normal(size=(n, 40))
        assert fid_to_stats(x, mu, sigma) == pytest.approx(frechet_distance(x, (mu, sigma)), rel=1e-6)


def test_fid_over_subsets_scores_disjoint_blocks():
    from argen.eval.quality import fid_over_subsets
    from argen.eval.reference import RefStats

    rng = np.random.default_rng(1)
    mu, sigma = feature_statistics(rng.normal(size=(200, 8)))
    stats = RefStats(mu=mu, sigma=sigma, n=200, dataset="test", identity=None)
    feats = rng.normal(size=(31, 8))
    out = fid_over_subsets(feats, stats, 3)  # 10 per subset; the 31st sample is left out
    assert out["n"] == 10 and len(out["values"]) == 3
    assert out["values"][1] == pytest.approx(fid_to_stats(feats[10:20], mu, sigma))
    assert out["mean"] == pytest.approx(np.mean(out["values"])) and out["std"] > 0
    with pytest.raises(ArgenError, match="at least 2"):
        fid_over_subsets(feats, stats, 20)


def test_reference_stats_cache_and_extractor_mismatch(tmp_path, fmnist_available):
    ref = write_pngs(tmp_path / "ref", random_images(6, 28))
    ext = FMNISTExtractor()
    first = reference_stats(ext, str(ref))
    assert first.n == 6 and first.path.is_file() and first.path.name.startswith(ext.key)
    with mock.patch.object(FMNISTExtractor, "extract", side_effect=AssertionError("recomputed")):
        again = reference_stats(ext, str(ref))
    assert again.path == first.path and np.array_equal(again.mu, first.mu)
    # The stats file records its extractor: another classifier's statistics are refused.
    other = FMNISTExtractor()
    other.weights_sha256 = "0" * 64
    with pytest.raises(ArgenError, match="weights_sha256"):
        reference_stats(other, str(first.path))
    # A changed folder is a different reference.
    write_pngs(ref, random_images(1, 28, seed=9), start=6)
    assert reference_stats(ext, str(ref)).n == 7


@pytest.mark.parametrize("case", ["empty", "one", "corrupt", "sizes", "modes", "both", "nothing", "unknown-ref"])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    d = tmp_path / "s"
    d.mkdir()
    args = ["eval", "fid", "--samples", str(d)]
    if case == "one":
        write_pngs(d, random_images(1, 32))
    elif case == "corrupt":
        write_pngs(d, random_images(2, 32))
        (d / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elif case == "sizes":
        write_pngs(d, random_images(2, 32))
        Image.fromarray(random_images(1, 28)[0]).save(d / "000009.png")
    elif case == "modes":
        write_pngs(d, random_images(2, 32))
        Image.fromarray(random_images(1, 32, channels=3)[0]).save(d / "000009.png")
    elif case == "both":
        args += ["--model", "default-c2i"]
    elif case == "nothing":
        args = ["eval", "fid"]
    elif case == "unknown-ref":
        write_pngs(d, random_images(2, 32))
        args += ["--ref", "imagenet:val"]
    expected = {"empty": "contains no images", "one": "at least 2", "corrupt": "cannot read image",
                "sizes": "mix image sizes/modes", "modes": "mix image sizes/modes", "both": "not both or neither",
                "nothing": "not both or neither", "unknown-ref": "unknown reference"}[case]
    code, out, err = run_main(capsys, *args)
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("argen: error:")


# --------------------------------------------------------------------------- sampling


def test_default_prompts_and_prompt_files(tmp_path):
    prompts = default_prompts()
    assert [label for _, label in prompts[:12]] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    txt = tmp_path / "p.txt"
    txt.write_text("a red bag\n\n  a boot \n")
    assert read_prompt_file(txt) == [("a red bag", None), ("a boot", None)]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a sneaker", "label": "sneaker"}\n{"prompt": "x", "label": 3}\n')
    assert read_prompt_file(jl) == [("a sneaker", 7), ("x", 3)]
    jl.write_text('{"prompt": ""}\n')
    with pytest.raises(ArgenError, match="line 1"):
        read_prompt_file(jl)


def test_sampling_resumes_after_kill_with_nothing_lost_or_duplicated(tmp_path, c2i_dir):
    pipe = ARPipeline.from_pretrained(c2i_dir)
    params = SamplingParams(cfg_scale=2.0)
    full = tmp_path / "full"
    summary = generate_samples(pipe, full, 10, params=params, seed=5, batch_size=4, log=None)
    assert summary["generated"] == 10 and summary["skipped"] == 0 and summary["nfe_per_image"] == 16

    killed = tmp_path / "killed"
    saved = []

    def die_after_four(index):
        saved.append(index)
        if len(saved) == 4:
            raise KeyboardInterrupt  # as if the process were killed right after image 3 hit the disk

    with pytest.raises(KeyboardInterrupt):
        generate_samples(pipe, killed, 10, params=params, seed=5, batch_size=3, log=None, on_saved=die_after_four)
    (killed / "samples" / ".000007.png.half.png").write_bytes(b"\x89PNG partial")  # a temp file cut off mid-write
    resumed = generate_samples(pipe, killed, 10, params=params, seed=5, batch_size=7, log=None)
    assert resumed["skipped"] == 4 and resumed["generated"] == 6  # exactly the missing ones are written
    assert png_bytes(killed / "samples") == png_bytes(full / "samples")  # same images, whatever the batch size
    assert not list((killed / "samples").glob(".*"))
    run, items = read_plan(killed)
    assert [it.label for it in items] == [i % 10 for i in range(10)] and [it.seed for it in items] == list(range(5, 15))
    again = generate_samples(pipe, killed, 10, params=params, seed=5, batch_size=7, log=None)
    assert again["generated"] == 0 and again["skipped"] == 10

    with pytest.raises(ArgenError, match="different run .*seed"):
        generate_samples(pipe, killed, 10, params=params, seed=6, log=None)
    with pytest.raises(ArgenError, match="different run .*params"):
        generate_samples(pipe, killed, 10, params=SamplingParams(cfg_scale=1.0), seed=5, log=None)
    more = generate_samples(pipe, killed, 12, params=params, seed=5, log=None)  # growing N extends the run
    assert more["generated"] == 2


def test_quality_scorer_equals_scoring_the_pngs(tmp_path, c2i_dir, fmnist_available):
    pipe = ARPipeline.from_pretrained(c2i_dir)
    out = tmp_path / "run"
    generate_samples(pipe, out, 10, params=SamplingParams(cfg_scale=2.0), seed=0, batch_size=10, log=None)
    from_disk = evaluate_samples(out, ref_num=1000)  # a class-balanced 1000-image reference keeps it quick
    assert from_disk["class_accuracy"] is not None and from_disk["fid_floor"] is not None

    conds = pipe.conditions(class_labels=list(range(10)))
    seeds = list(range(10))
    tokens = pipe.sample_tokens(conds, seeds, "ar", SamplingParams(cfg_scale=2.0)).tokens
    images = torch.cat([pipe.tokens_to_images(tokens[i:i + 1], conds[i:i + 1], seeds[i:i + 1]) for i in range(10)])
    score = quality_scorer(10, ref_num=1000)(images, conds.labels)
    for key in ("fid", "is", "class_accuracy", "precision", "recall", "fid_floor"):
        assert score[key] == pytest.approx(from_disk[key], rel=1e-9, abs=1e-12), key
    assert 1.0 <= score["is"] <= 10.0 and 0.0 <= score["class_accuracy"] <= 1.0


def test_accelerate_two_processes_match_one_process(tmp_path, capsys, c2i_dir, fmnist_available):
    """`accelerate launch` with 2 CPU processes: same PNGs and the same metrics as 1 process."""
    common = ["eval", "fid", "--model", str(c2i_dir), "--num-samples", "8", "--batch-size", "3", "--seed", "3",
              "--threads", "1", "--ref-num", "1000", "--feature-batch-size", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    code, out, err = run_main(capsys, *common, "--out", str(one), "--npz")
    assert code == 0, err
    proc = launch_two_processes([*common, "--out", two, "--npz"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 1/2] 3 image(s) to generate" in proc.stderr  # really two processes: blocks {0-2, 6-7}, {3-5}
    assert proc.stdout.count("| FID") == 1  # only the main process reports
    assert png_bytes(one / "samples") == png_bytes(two / "samples") and len(png_bytes(one / "samples")) == 8
    assert np.array_equal(read_sample_npz(one / "samples.npz"), read_sample_npz(two / "samples.npz"))
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    for key in ("fid", "is", "class_accuracy", "precision", "recall", "fid_floor"):
        assert m1[key] == m2[key], key  # bit-identical: every batch holds the same images
    assert m2["sampling_run"]["processes"] == 2 and m2["sampling_run"]["generated"] == 8


def test_cli_ref_stats_on_a_folder(tmp_path, capsys, fmnist_available):
    ref = write_pngs(tmp_path / "ref", random_images(8, 28))
    assert main(["eval", "ref-stats", "--ref", str(ref), "--json", str(tmp_path / "r.json")]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["feature_dim"] == 128 and record["ref"]["n"] == 8
    assert record["extractor"]["extractor"] == "fmnist"
    capsys.readouterr()
    assert main(["eval", "ref-stats", "--ref", str(ref), "--ref-num", "1"]) == 2
    assert "--ref-num" in capsys.readouterr().err
    # more than the folder holds: refused (it was capped silently, and cached under the asked-for count)
    assert main(["eval", "ref-stats", "--ref", str(ref), "--ref-num", "9", "--refresh"]) == 2
    assert "holds 8" in capsys.readouterr().err


def test_inception_weights_are_never_unpickled_unsafely(inception_weights):
    real_load = torch.load
    calls = []

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    with mock.patch.object(torch, "load", recording_load):
        InceptionExtractor(inception_weights, protocol="adm")
    assert calls == [True]  # opened once, tensors only; torch-fidelity never gets the path
