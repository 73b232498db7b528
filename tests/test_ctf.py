"""Coarse-to-fine prediction (`argen.refiners.ctf`): k-means coarse labels, the one-pass refiner,
the chain checks of a pipeline holding it, and a tiny two-stage training run that generates."""

import pytest
import torch

from argen.errors import ArgenError
from argen.pipeline import ARPipeline
from argen.refiners import CTFRefiner, coarse_labels
from argen.tokenizers.vq import VQTokenizer

from helpers import randomize, tiny_gpt


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _points(n=64, d=4, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _tiny_vq(codebook=32):
    torch.manual_seed(0)
    return VQTokenizer(codebook_size=codebook, codebook_embed_dim=4, encoder_ch_mult=(1, 1, 1, 1),
                       decoder_ch_mult=(1, 1, 1, 1), z_channels=8, ch=8, num_res_blocks=1, in_channels=1,
                       norm_groups=4, image_size=32).eval()


def _refiner(k=4, vocab=32, tokens=16, seed=1, **kw):
    torch.manual_seed(0)
    ref = CTFRefiner(num_clusters=k, vocab=vocab, tokens=tokens, grid=[4, 4], dim=32, n_layer=1, n_head=2, **kw)
    ref.set_clusters(coarse_labels(_points(vocab), k, seed=0))
    return randomize(ref, seed)  # random weights give spread-out, input-dependent logits


# -- k-means coarse labels ------------------------------------------------------------------


def test_kmeans_labels_are_deterministic_per_seed_and_cover_every_cluster():
    x = _points(64)
    a, b = coarse_labels(x, 8, seed=3), coarse_labels(x.clone(), 8, seed=3)
    assert a.dtype == torch.int64 and a.shape == (64,)
    assert torch.equal(a, b)
    assert sorted(torch.unique(a).tolist()) == list(range(8))
    # ids are numbered by their first code, so they do not depend on sklearn's internal order
    firsts = [int((a == c).nonzero()[0]) for c in range(8)]
    assert firsts == sorted(firsts)
    # the seed is really used: over a few seeds, the k-means++ starts give other partitions
    assert any(not torch.equal(a, coarse_labels(x, 8, seed=s, n_init=1)) for s in range(4))


def test_kmeans_normalizes_when_asked_and_rejects_bad_k():
    x = _points(32)
    scaled = x * torch.rand(32, 1, generator=torch.Generator().manual_seed(1)).add(0.1) * 10
    assert torch.equal(coarse_labels(x, 4, normalize=True), coarse_labels(scaled, 4, normalize=True))
    for bad in (1, 33, 2.5):
        with pytest.raises(ArgenError, match="number of clusters"):
            coarse_labels(x, bad)
    with pytest.raises(ArgenError, match="no codebook"):
        coarse_labels(None, 4)


# -- the refiner ----------------------------------------------------------------------------


def test_restricted_sampling_never_leaves_the_cluster():
    ref = _refiner().set_sampling(temperature=2.0)  # hot: mass everywhere, so leaving would show
    g = torch.Generator().manual_seed(5)
    coarse = torch.randint(0, 4, (32, 16), generator=g)
    cond = torch.randint(0, 10, (32,), generator=g)
    codes = ref.refine(coarse, cond, seeds=list(range(32)))
    assert codes.shape == coarse.shape and codes.dtype == torch.int64
    assert torch.equal(ref.code_to_cluster[codes], coarse)
    free = ref.set_sampling(restrict=False).refine(coarse, cond, seeds=list(range(32)))
    assert not torch.equal(ref.code_to_cluster[free], coarse)  # the unrestricted draw does leave
    greedy = ref.set_sampling(temperature=0, restrict=True).refine(coarse, cond)
    assert torch.equal(ref.code_to_cluster[greedy], coarse)


def test_refiner_guidance_mixes_the_conditional_and_null_class_passes():
    """A refiner trained with class dropout has a null class, and `guidance` g > 1 samples from
    null + g * (cond - null) before the cluster mask; g = 1 is the conditional pass alone."""
    ref = _refiner(class_dropout_prob=0.1)
    g = torch.Generator().manual_seed(3)
    coarse = torch.randint(0, 4, (5, 16), generator=g)
    cond = torch.randint(0, 10, (5,), generator=g)
    plain = ref.scores(coarse, cond)
    assert torch.equal(plain, ref.restricted(ref(coarse, cond), coarse))
    null = torch.full_like(cond, 10)
    c, u = ref(coarse, cond), ref._network(coarse, null)  # the null row is not a class a caller may pass
    guided = ref.set_sampling(guidance=2.5).scores(coarse, cond)
    assert torch.allclose(guided, ref.restricted(u + 2.5 * (c - u), coarse), atol=1e-5, rtol=0)
    assert not torch.allclose(guided, plain)  # the null class really differs
    codes = ref.set_sampling(temperature=2.0).refine(coarse, cond, seeds=list(range(5)))
    assert torch.equal(ref.code_to_cluster[codes], coarse)  # guided draws stay in their clusters
    for bad in (0.5, -1, float("inf"), "2", True):
        with pytest.raises(ArgenError, match="refiner guidance"):
            ref.set_sampling(guidance=bad)
    with pytest.raises(ArgenError, match="without class dropout"):
        _refiner().set_sampling(guidance=2.0)  # no null class to guide against
    with pytest.raises(ArgenError, match="without class dropout"):
        _refiner(guidance=2.0)


def test_refine_is_deterministic_per_image_seed_and_one_pass():
    ref = _refiner()
    g = torch.Generator().manual_seed(7)
    coarse = torch.randint(0, 4, (6, 16), generator=g)
    cond = torch.randint(0, 10, (6,), generator=g)
    whole = ref.refine(coarse, cond, seeds=[10, 11, 12, 13, 14, 15])
    parts = torch.cat([ref.refine(coarse[i:i + 1], cond[i:i + 1], seeds=[10 + i]) for i in range(6)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, ref.refine(coarse, cond, seeds=[20, 21, 22, 23, 24, 25]))
    # bidirectional: changing the last coarse label changes the logits of the first position
    changed = coarse.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 4
    assert not torch.allclose(ref(coarse, cond)[:, 0], ref(changed, cond)[:, 0])


def test_compiled_pass_draws_the_eager_codes():
    """compile_pass (the pipeline's --compile) compiles the network and the cluster mask: the same codes as
    eager for the same seeds, restricted or not, guided or not; a recompile follows a changed `restrict`
    or `guidance`."""
    g = torch.Generator().manual_seed(9)
    coarse = torch.randint(0, 4, (4, 16), generator=g)
    cond, seeds = torch.randint(0, 10, (4,), generator=g), [3, 1, 4, 1]
    eager = _refiner().set_sampling(temperature=1.5)
    compiled = _refiner().set_sampling(temperature=1.5).compile_pass("max-autotune")
    for restrict in (True, False):
        expect = eager.set_sampling(restrict=restrict).refine(coarse, cond, seeds=seeds)
        assert torch.equal(compiled.set_sampling(restrict=restrict).refine(coarse, cond, seeds=seeds), expect)
    assert not torch.equal(compiled.code_to_cluster[expect], coarse)  # the unrestricted pass really ran
    # refiner guidance: the compiled pass follows a changed scale (a new graph), as eager does
    eager, compiled = (_refiner(class_dropout_prob=0.1).set_sampling(temperature=1.5) for _ in range(2))
    compiled.compile_pass()
    draws = []
    for guidance in (1.0, 2.5):
        draws.append(eager.set_sampling(guidance=guidance).refine(coarse, cond, seeds=seeds))
        assert torch.equal(compiled.set_sampling(guidance=guidance).refine(coarse, cond, seeds=seeds), draws[-1])
    assert not torch.equal(draws[0], draws[1])
    with pytest.raises(ArgenError, match="compile mode"):
        _refiner().compile_pass("fastest")


def test_decoder_dtype_bf16_runs_the_shipped_refiner_in_bf16():
    """decoder_dtype="bf16" casts the refiner with the tokenizer: same coarse labels and seeds, nearly
    the same codes, every code still inside its position's cluster; the generator stays fp32."""
    fp32, bf16 = (ARPipeline.from_pretrained("ctf-c2i", decoder_dtype=d) for d in ("fp32", "bf16"))
    assert next(bf16.refiner.parameters()).dtype == torch.bfloat16 and bf16.dtype == torch.float32
    assert next(fp32.refiner.parameters()).dtype == torch.float32
    g = torch.Generator().manual_seed(3)
    coarse = torch.randint(0, fp32.refiner.in_vocab_size, (8, fp32.refiner.num_tokens), generator=g)
    cond, seeds = torch.arange(8) % 10, list(range(8))
    a, b = fp32.refiner.refine(coarse, cond, seeds=seeds), bf16.refiner.refine(coarse, cond, seeds=seeds)
    assert torch.equal(bf16.refiner.codes_to_coarse(b), coarse)
    assert 0.9 < (a == b).float().mean() < 1.0  # bf16 logits move a few draws (96.7% kept here)


def test_refiner_rejects_bad_inputs_in_one_line():
    ref = _refiner()
    cases = [(torch.zeros(2, 15, dtype=torch.long), torch.zeros(2, dtype=torch.long), "coarse labels"),
             (torch.full((2, 16), 4), torch.zeros(2, dtype=torch.long), "coarse label out of range"),
             (torch.zeros(2, 16, dtype=torch.long), torch.zeros(3, dtype=torch.long), "class ids"),
             (torch.zeros(2, 16, dtype=torch.long), torch.full((2,), 10), "class id out of range")]
    for coarse, cond, words in cases:
        with pytest.raises(ArgenError, match=words) as err:
            ref.refine(coarse, cond)
        assert "\n" not in str(err.value)
    with pytest.raises(ArgenError, match="at least one code"):
        ref.set_clusters(torch.zeros(32, dtype=torch.long))
    with pytest.raises(ArgenError, match="temperature"):
        ref.set_sampling(temperature=-1)


def test_clusters_survive_save_and_fp16(tmp_path):
    ref = _refiner()
    ref.save_pretrained(tmp_path / "r", dtype=torch.float16)
    back = CTFRefiner.from_pretrained(tmp_path / "r")
    assert torch.equal(back.code_to_cluster, ref.code_to_cluster)


# -- the chain ------------------------------------------------------------------------------


def test_chain_vocabulary_errors_are_one_line():
    vq = _tiny_vq(32)
    good = tiny_gpt(vocab_size=4, block_size=16)
    ARPipeline(good, vq, refiner=_refiner())  # coarse GPT (4) -> refiner (4 -> 32) -> VQ (32)
    with pytest.raises(ArgenError) as err:
        ARPipeline(tiny_gpt(vocab_size=8, block_size=16), vq, refiner=_refiner())
    assert "\n" not in str(err.value) and "refiner (CTFRefiner) input" in str(err.value) and "8" in str(err.value)
    with pytest.raises(ArgenError) as err:
        ARPipeline(good, _tiny_vq(64), refiner=_refiner())
    assert "\n" not in str(err.value) and "tokenizer (VQTokenizer) takes 64" in str(err.value)
    with pytest.raises(ArgenError) as err:
        ARPipeline(good, vq)  # a coarse generator without its refiner
    assert "\n" not in str(err.value) and "vocabulary of 4" in str(err.value)


# -- training both stages -------------------------------------------------------------------


def test_two_stage_training_gives_a_pipeline_that_generates(tmp_path, fmnist_available):
    from argen.train.gpt import train_gpt
    from argen.train.refiner import train_refiner

    vq_dir = tmp_path / "vq"
    _tiny_vq(32).save_pretrained(vq_dir)
    common = dict(vq=str(vq_dir), steps=3, batch_size=8, warmup_steps=1, limit=32, progress=False,
                  codes_cache=str(tmp_path / "codes.safetensors"), dim=16, n_layer=1, n_head=2)
    gpt_kw = dict(common, model_type="c2i", samples_per_class=1, eval_items=8, accuracy_per_class=0)
    # stage 1 may train before its refiner exists (same k-means seed), and exports once it does
    with pytest.raises(ArgenError, match="does not exist: train the refiner"):
        train_gpt(tmp_path / "gpt", coarse_clusters=4, kmeans_seed=0, refiner=str(tmp_path / "ref" / "model"), **gpt_kw)
    metrics = train_refiner(tmp_path / "ref", num_clusters=4, kmeans_seed=0, eval_items=8, **common)
    assert 0 <= metrics["test_fp32"]["accuracy"] <= metrics["test_fp32"]["accuracy_restricted"] <= 1
    train_gpt(tmp_path / "gpt", coarse_clusters=4, kmeans_seed=0, refiner=str(tmp_path / "ref" / "model"),
              resume=True, **gpt_kw)
    # a refiner on other clusters (another k-means seed) is refused, in one line
    train_refiner(tmp_path / "ref7", num_clusters=4, kmeans_seed=7, eval_items=8, **common)
    with pytest.raises(ArgenError, match="different coarse"):
        train_gpt(tmp_path / "gpt", coarse_clusters=4, kmeans_seed=0, refiner=str(tmp_path / "ref7" / "model"),
                  resume=True, **gpt_kw)

    pipe = ARPipeline.from_pretrained(tmp_path / "gpt" / "model")  # generator + refiner + tokenizer
    assert pipe.generator.vocab_size == 4 and isinstance(pipe.refiner, CTFRefiner)
    for sampler in ("ar", "sjd", "mcsjd", "gsd:embeddings=codebook"):  # unchanged samplers on the coarse stage
        out = pipe(class_labels=[0, 7], num_images=2, sampler=sampler, seed=3, progress=False)
        assert len(out.images) == 4 and out.images[0].size == (28, 28)
        assert int(out.tokens.max()) < 4
    again = pipe(class_labels=[0, 7], num_images=2, seed=3, progress=False, batch_size=1)
    assert [a.tobytes() for a in again.images] == \
        [a.tobytes() for a in pipe(class_labels=[0, 7], num_images=2, seed=3, progress=False).images]
