"""The `draft` sampler (speculative decoding with a small draft model): exactness, bookkeeping,
determinism across batches, and how it gets its drafter (pipeline.json, --drafter, one-line errors).

Exactness is tested as for the other speculative samplers (tests/test_speculative.py, whose
helpers are reused): chi-square tests at a fixed seed on a Markov chain posing as a generator and
on a tiny random GPT, each time with a drafter that is a *different* model, so drafts are both
accepted and rejected.
"""

import json

import pytest
import torch

from argen.cli.main import main
from argen.errors import ArgenError
from argen.pipeline import ARPipeline
from argen.samplers import ARSampler, SamplingParams, get_sampler
from argen.samplers.draft import DraftSampler
from argen.tokenizers.base import ImageTokenizer
from argen.registry import load_component
from argen.hub import resolve_model_dir

from helpers import assert_rows_as_if_alone, left_padded_captions, tiny_gpt, tiny_t2i
from test_train import tiny_vq_dir  # noqa: F401  (a fixture: a tiny untrained VQ folder)
from test_speculative import MARKOV_PARAMS, MarkovModel, assert_matches_exact_and_ar, assert_pairs_exact

BATCH_PARAMS = {
    "plain": SamplingParams(),
    "cfg_topk": SamplingParams(cfg_scale=3.0, top_k=20),
    "interval_topp": SamplingParams(cfg_scale=2.0, cfg_interval=4, top_p=0.8, temperature=0.9),
    "cosine": SamplingParams(cfg_scale=3.0, cfg_schedule="cosine"),
}


# early-stop thresholds that cut some windows short and leave others whole on these tiny models
STOP, MARKOV_STOP = 0.15, 0.3


def draft(window, drafter) -> DraftSampler:
    return get_sampler(f"draft:L={window}").prepare(draft=drafter)


# ---- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["draft:L=2", "draft:L=4", f"draft:L=4,stop={MARKOV_STOP}"])
@pytest.mark.parametrize("setting", list(MARKOV_PARAMS))
def test_lossless_on_markov_chain_with_a_different_drafter(spec, setting):
    torch.manual_seed(1234)
    model, drafter = MarkovModel(seed=0), MarkovModel(seed=5, scale=1.0)
    params, n, cls = MARKOV_PARAMS[setting], 20000, 1
    sampler = get_sampler(spec).prepare(draft=drafter)
    out = sampler(model, torch.full((n,), cls), params=params)
    assert 0.05 < sampler.acceptance < 0.95  # drafts were accepted and rejected
    assert out.forwards_per_sample.double().mean() < model.num_positions - 1
    if sampler.stop:  # windows really were cut short by the drafter's own probabilities
        drafts = out.draft_forwards_per_sample.double().mean() - 1  # one drafter forward per draft after the prefill
        assert drafts < 0.95 * (draft(4, drafter)(model, torch.full((n,), cls), params=params)
                               .draft_forwards_per_sample.double().mean() - 1)
    assert_pairs_exact(model, out.tokens, cls, params)


@pytest.mark.parametrize("stop", [0.0, STOP])
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(cfg_scale=2.5, top_k=8, top_p=0.9)],
                         ids=["plain", "cfg_filters"])
def test_lossless_on_tiny_gpt_with_a_different_drafter(params, stop):
    model = tiny_gpt(vocab_size=16, dim=32, n_layer=1, multiple_of=32, block_size=9)
    drafter = tiny_gpt(seed=2, vocab_size=16, dim=32, n_layer=1, multiple_of=32, block_size=9)
    n, cond = 4000, 3
    conds = torch.full((n,), cond)
    torch.manual_seed(7)
    sampler = get_sampler(f"draft:L=4,stop={stop}").prepare(draft=drafter)
    out = sampler(model, conds, params=params)
    ar = ARSampler()(model, conds, params=params)
    assert 0.05 < sampler.acceptance < 0.95
    assert out.forwards_per_sample.double().mean() < ar.num_forward_passes - 1
    if stop:  # the stop really shortened windows: fewer drafter forwards than drafting every slot
        full = draft(4, drafter)(model, conds[:500], params=params, seeds=range(500))
        cut = sampler(model, conds[:500], params=params, seeds=range(500))
        assert cut.draft_forwards_per_sample.sum() < 0.9 * full.draft_forwards_per_sample.sum()
    assert_matches_exact_and_ar(model, out.tokens, ar.tokens, cond, params)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_greedy_drafting_reproduces_greedy_ar(cfg):
    """Index alignment: with one-hot targets an off-by-one between drafter and target would emit a
    wrong token, whatever the drafter proposes."""
    model, drafter = tiny_gpt(), tiny_gpt(seed=4, n_layer=1)
    params = SamplingParams(cfg_scale=cfg, top_k=1)
    cond = torch.tensor([1, 4, 9])
    greedy = ARSampler(sample=False)(model, cond, params=params).tokens
    out = draft(5, drafter)(model, cond, params=params, seeds=[3, 4, 5])
    assert torch.equal(out.tokens, greedy)


# ---- bookkeeping -----------------------------------------------------------------------------


def test_the_target_as_its_own_drafter_accepts_everything_and_counts_both_models():
    model = tiny_gpt()  # 16 positions
    sampler = draft(4, model)
    out = sampler(model, torch.tensor([2, 7]), params=SamplingParams(cfg_scale=2.0), seeds=[0, 1])
    assert sampler.acceptance == 1.0
    # token 0 from the prefill, then windows of 4 (3 drafts + bonus) over 15 tokens: 4, 4, 4, 3
    assert out.accepted_per_forward == [4, 4, 4, 3] and out.num_forward_passes == 5
    # drafter: its prefill, then 3 + 3 + 3 + 2 one-token steps (only what the next window verifies)
    assert out.draft_forward_passes == 12 and out.draft_forwards_per_sample.tolist() == [12, 12]
    assert torch.equal(out.tokens, draft(4, model)(model, torch.tensor([2, 7]), params=SamplingParams(cfg_scale=2.0),
                                                   seeds=[0, 1]).tokens)


def test_stop_one_drafts_a_single_token_per_window_and_counts_it():
    """stop=1: every draft has q < 1, so each window is one draft + the bonus row, and the drafter
    runs once per window; the target as its own drafter accepts them all."""
    model = tiny_gpt()  # 16 positions
    sampler = get_sampler("draft:L=6,stop=1").prepare(draft=model)
    out = sampler(model, torch.tensor([2, 7]), params=SamplingParams(cfg_scale=2.0), seeds=[0, 1])
    assert sampler.acceptance == 1.0
    # token 0 from the prefill, then 7 windows of 2 tokens and a last one of 1 (no draft left)
    assert out.accepted_per_forward == [2] * 7 + [1] and out.num_forward_passes == 9
    assert out.draft_forward_passes == 8 and out.draft_forwards_per_sample.tolist() == [8, 8]


def test_early_stop_cuts_drafter_forwards_and_keeps_batches_ragged():
    model, drafter = tiny_gpt(), tiny_gpt(seed=3, n_layer=1)
    params, cond, seeds = SamplingParams(cfg_scale=3.0, top_k=20), torch.tensor([3, 3, 6, 1, 9]), [21, 22, 23, 24, 25]
    full = draft(8, drafter)(model, cond, params=params, seeds=seeds)
    sampler = get_sampler(f"draft:L=8,stop={STOP}").prepare(draft=drafter)
    batch = sampler(model, cond, params=params, seeds=seeds)
    assert batch.draft_forward_passes < full.draft_forward_passes
    assert (batch.draft_forwards_per_sample <= full.draft_forwards_per_sample).all()
    assert batch.draft_forwards_per_sample.sum() < full.draft_forwards_per_sample.sum()
    # rows with windows of their own lengths: each as if alone
    assert_rows_as_if_alone(sampler, model, cond, params, seeds, batch, ragged=False)
    with pytest.raises(ArgenError, match="stop"):
        get_sampler("draft:L=8,stop=1.5")


@pytest.mark.parametrize("setting", list(BATCH_PARAMS))
def test_ragged_batch_equals_batch_of_one(setting):
    model, drafter = tiny_gpt(), tiny_gpt(seed=3, n_layer=1)
    params = BATCH_PARAMS[setting]
    cond, seeds = torch.tensor([3, 3, 6, 1, 9]), [21, 22, 23, 24, 25]
    sampler = draft(5, drafter)
    batch = sampler(model, cond, params=params, seeds=seeds)
    assert_rows_as_if_alone(sampler, model, cond, params, seeds, batch)


def test_ragged_batch_equals_batch_of_one_t2i():
    model, drafter = tiny_t2i(), tiny_t2i(seed=5, n_layer=1)
    feats, mask = left_padded_captions(4, 6, 12, lengths=[6, 2, 4, 1])
    seeds, params = [5, 6, 7, 8], SamplingParams(cfg_scale=2.0, top_k=30)
    sampler = draft(6, drafter)
    batch = sampler(model, feats, cond_mask=mask, params=params, seeds=seeds)
    for i in (1, 3):
        alone = sampler(model, feats[i:i + 1], cond_mask=mask[i:i + 1], params=params, seeds=seeds[i:i + 1])
        assert torch.equal(alone.tokens[0], batch.tokens[i])


def test_short_images_and_global_rng():
    model, drafter = tiny_gpt(), tiny_gpt(seed=3, n_layer=1)
    sampler = draft(6, drafter)
    out = sampler(model, torch.tensor([1, 2]), num_tokens=5, seeds=[0, 1])
    assert out.tokens.shape == (2, 5) and len(out.accepted_per_forward) == out.num_forward_passes - 1
    one = sampler(model, torch.tensor([1]), num_tokens=1, seeds=[0])
    assert one.num_forward_passes == 1 and one.draft_forward_passes == 1 and one.tokens.shape == (1, 1)
    torch.manual_seed(3)
    a = sampler(model, torch.tensor([1, 2]))
    torch.manual_seed(3)
    assert torch.equal(a.tokens, sampler(model, torch.tensor([1, 2])).tokens)


# ---- the drafter: where it comes from, and refusals --------------------------------------------


def test_missing_or_mismatched_drafter_is_one_line():
    model = tiny_gpt()
    with pytest.raises(ArgenError, match="needs a draft model") as err:
        get_sampler("draft")(model, torch.tensor([1]), seeds=[0])
    assert "\n" not in str(err.value) and "pipeline.json" in str(err.value)
    with pytest.raises(ArgenError, match="vocab_size"):
        draft(4, tiny_gpt(vocab_size=32))(model, torch.tensor([1]), seeds=[0])
    with pytest.raises(ArgenError, match="condition_kind"):
        draft(4, tiny_t2i())(model, torch.tensor([1]), seeds=[0])
    no_null = tiny_gpt(class_dropout_prob=0.0)
    with pytest.raises(ArgenError, match="drafter trained with condition dropout"):
        draft(4, no_null)(model, torch.tensor([1]), params=SamplingParams(cfg_scale=2.0), seeds=[0])
    assert draft(4, tiny_gpt()).prepare(draft=None).drafter is not None  # a pipeline without one keeps it


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """A tiny 8x8-token c2i pipeline on the shipped default-vq, saved with and without a drafter."""
    vq = load_component(resolve_model_dir("default-vq"), ImageTokenizer)
    small = dict(vocab_size=vq.vocab_size, block_size=vq.num_tokens, dim=32, n_head=2, multiple_of=32)
    target, drafter = tiny_gpt(n_layer=2, **small), tiny_gpt(seed=9, n_layer=1, **small)
    root = tmp_path_factory.mktemp("draft")
    names = ["a", "b", "c"]
    ARPipeline(target, vq, class_names=names, defaults={"cfg_scale": 2.0}, drafter=drafter).save_pretrained(root / "with")
    ARPipeline(target, vq, class_names=names, defaults={"cfg_scale": 2.0}).save_pretrained(root / "without")
    drafter.save_pretrained(root / "drafter-only")
    return root


def test_pipeline_saves_loads_and_hands_over_its_drafter(pipelines):
    meta = json.loads((pipelines / "with" / "pipeline.json").read_text())
    assert meta["drafter"] == "drafter"
    assert "drafter" not in json.loads((pipelines / "without" / "pipeline.json").read_text())
    pipe = ARPipeline.from_pretrained(pipelines / "with")
    conds = pipe.conditions(class_labels=[0, 1, 2])
    out = pipe.sample_tokens(conds, [0, 1, 2], "draft:L=4", batch_size=2)
    assert out.tokens.shape == (3, 64) and out.draft_forward_passes > 0
    assert out.draft_forwards_per_sample.shape == (3,)
    alone = pipe.sample_tokens(conds[1:2], [1], "draft:L=4", batch_size=1)
    assert torch.equal(alone.tokens[0], out.tokens[1])
    # the same drafter given by path to the pipeline without one gives the same samples
    other = ARPipeline.from_pretrained(pipelines / "without", drafter=str(pipelines / "drafter-only"))
    assert torch.equal(other.sample_tokens(conds, [0, 1, 2], "draft:L=4").tokens, out.tokens)
    with pytest.raises(ArgenError, match="needs a draft model"):
        ARPipeline.from_pretrained(pipelines / "without").sample_tokens(conds, [0, 1, 2], "draft")


def test_cli_samples_with_the_drafter_and_refuses_without_one(pipelines, tmp_path, capsys):
    with_dir, without = str(pipelines / "with"), str(pipelines / "without")
    assert main(["generate", "--model", with_dir, "--class", "1", "--num-images", "2", "--sampler", "draft:L=3",
                 "--out", str(tmp_path / "a.png")]) == 0
    assert main(["generate", "--model", without, "--drafter", str(pipelines / "drafter-only"), "--class", "1",
                 "--num-images", "2", "--sampler", "draft:L=3", "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    capsys.readouterr()
    assert main(["generate", "--model", without, "--class", "1", "--sampler", "draft", "--out",
                 str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a draft model" in err and not (tmp_path / "c.png").exists()
    record = tmp_path / "bench.json"
    assert main(["bench", "samplers", "draft:L=4", "--model", with_dir, "--batch-sizes", "2", "--num-images", "2",
                 "--rounds", "1", "--forward-cost", "", "--json", str(record)]) == 0
    rows = {r["sampler"]: r for r in json.loads(record.read_text())["records"]}
    assert rows["ar"]["draft_nfe_per_image"] is None and rows["draft"]["draft_nfe_per_image"] > 1
    assert "Draft-model forwards per image" in capsys.readouterr().out
    run = tmp_path / "samples"
    assert main(["eval", "sample", "--model", with_dir, "--sampler", "draft:L=4", "--num-samples", "3", "--out",
                 str(run), "--threads", "1"]) == 0
    settings = json.loads((run / "sampling.json").read_text())
    assert settings["drafter_fingerprint"]  # a resumed run must use the same drafter: its samples depend on it
    assert len(list((run / "samples").glob("*.png"))) == 3
    ar_run = tmp_path / "ar-samples"
    assert main(["eval", "sample", "--model", with_dir, "--num-samples", "1", "--out", str(ar_run)]) == 0
    assert "drafter_fingerprint" not in json.loads((ar_run / "sampling.json").read_text())


@pytest.mark.parametrize("name", ["default-c2i", "default-t2i"])
def test_shipped_pipelines_name_a_drafter_that_cuts_target_forwards(name):
    """Both shipped generators load their distilled drafter from pipeline.json; on 4 images it
    already saves more than half of the 64 target forwards (docs: about 3x on 96-1,000 images)."""
    pipe = ARPipeline.from_pretrained(name)
    assert pipe.drafter is not None and pipe.drafter.condition_kind == pipe.generator.condition_kind
    assert pipe.drafter.num_parameters() < 0.7 * pipe.generator.num_parameters()
    conds = pipe.conditions(class_labels=[0, 7]) if name == "default-c2i" else \
        pipe.conditions(prompt=["a pair of running shoes", "a knitted sweater"])
    params = SamplingParams(cfg_scale=pipe.defaults["cfg_scale"])
    out = pipe.sample_tokens(conds, [0, 1], "draft:L=16", params, 2)
    assert out.nfe_per_sample.double().mean() < 32


# ---- training a drafter by distillation --------------------------------------------------------


def test_distill_loss_is_the_kl_between_guided_distributions():
    from argen.samplers.logits import logits_to_probs
    from argen.train.gpt import distill_loss

    teacher = tiny_gpt()
    student = tiny_gpt(seed=6, n_layer=1, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    codes, labels = torch.randint(0, 64, (32, 16)), torch.arange(32) % 10
    params = SamplingParams(cfg_scale=2.5)
    assert distill_loss(teacher, teacher, teacher, codes, labels, None, params).item() == pytest.approx(0, abs=1e-5)
    student.train()  # condition dropout (0.1) must not touch the explicit (condition, null) pairs
    loss = distill_loss(student, student, teacher, codes, labels, None, params)
    student.eval()
    both = torch.cat([labels, student.null_condition(labels)])
    inputs = torch.cat([codes[:, :-1]] * 2)
    p = logits_to_probs(teacher(inputs, both), params).double()  # the samplers' own path, every position
    q = logits_to_probs(student(inputs, both), params).double()
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4) and loss.item() > 0.01
    loss.backward()
    assert student.output.weight.grad.abs().sum() > 0


def test_distilled_drafter_trains_and_says_so(tmp_path, tiny_vq_dir):
    from argen.train.common import read_log
    from argen.train.gpt import train_gpt

    kw = dict(model_type="c2i", vq=str(tiny_vq_dir), batch_size=16, warmup_steps=2, limit=64, log_every=2,
              ckpt_every=20, progress=False, samples_per_class=1, eval_items=16, accuracy_per_class=0)
    train_gpt(tmp_path / "teacher", steps=10, lr=3e-3, dim=32, n_layer=2, n_head=2, **kw)
    teacher = str(tmp_path / "teacher" / "model")
    with pytest.raises(ArgenError, match="--distill-from"):
        train_gpt(tmp_path / "bad", steps=2, dim=32, n_layer=1, n_head=2, distill_from=teacher, shuffle=2, **kw)
    train_gpt(tmp_path / "drafter", steps=16, lr=3e-3, dim=32, n_layer=1, n_head=2, distill_from=teacher,
              distill_cfg=2.0, **kw)
    rows = read_log(tmp_path / "drafter" / "log.csv")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    card = (tmp_path / "drafter" / "model" / "MODEL_CARD.md").read_text()
    assert "distilled from" in card and "CFG 2.0" in card
    target = ARPipeline.from_pretrained(teacher, drafter=str(tmp_path / "drafter" / "model"))
    out = target.sample_tokens(target.conditions(class_labels=[0, 1]), [0, 1], "draft:L=4")
    assert out.tokens.shape == (2, 16)
