"""CTF refiner training on VQ codes of Fashion-MNIST (`argen train refiner`).

1. Coarse labels: scikit-learn k-means over the tokenizer's codebook embeddings
   (`argen.refiners.ctf.coarse_labels`, seeded), stored in the refiner as `code_to_cluster`.
2. The train split is encoded once (the same codes cache as `argen train gpt`, so both stages
   can share one file). Coarse labels are a function of the codes, so the data costs nothing.
3. Cross-entropy of the fine code at every position given the ground-truth coarse sequence and
   the class, all positions in one bidirectional pass. The same Trainer as the GPT (EMA,
   checkpoints, exact resume).
4. The EMA weights are exported to `<out>/model` with test cross-entropy and accuracy (argmax,
   with and without restricting to each position's cluster).
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from ..errors import ArgenError
from ..hub import resolve_model_dir
from ..refiners.ctf import CTFRefiner, coarse_labels
from ..registry import load_component
from ..tokenizers.base import ImageTokenizer
from .common import (Trainer, TrainConfig, check_batch_size, check_run_args, check_trainable_size, seed_everything,
                     set_threads, write_json)
from .gpt import CodeBatches, _weights_hash, encode_images, training_codes, training_items
from .rundir import check_codes_cache, check_run_dir, claim_run_dir, list_in_marker


def train_refiner(out, *, vq, num_clusters: int = 64, kmeans_seed: int = 0, normalize: bool = False,
                  steps: Optional[int] = None, epochs: Optional[float] = None, batch_size: int = 64,
                  lr: float = 1e-3, seed: int = 0, warmup_steps: int = 200, weight_decay: float = 0.05,
                  ema_decay: float = 0.999, grad_clip: float = 1.0, dim: int = 256, n_layer: int = 4, n_head: int = 4,
                  dropout: float = 0.0, class_dropout: float = 0.0, temperature: float = 1.0, restrict: bool = True,
                  flip: bool = False, codes_cache=None, limit: Optional[int] = None, ckpt_every: int = 500,
                  log_every: int = 25, resume: bool = False, threads: Optional[int] = None, progress: bool = True,
                  export_dtype: str = "auto", command: Optional[str] = None, eval_items: int = 2000,
                  data_root=None, stop_at_step: Optional[int] = None) -> dict:
    """Train a CTF refiner for the tokenizer `vq` (folder or shipped name); returns final metrics."""
    from ..distributed import make_accelerator
    import math

    set_threads(threads)
    check_run_args(steps, epochs, export_dtype, limit=limit)
    check_codes_cache(codes_cache)
    check_run_dir(out, resume)
    vq_dir = resolve_model_dir(vq)
    vq_model = load_component(vq_dir, ImageTokenizer).float().eval()
    c2c = coarse_labels(vq_model.codebook_embeddings(), num_clusters, kmeans_seed, normalize)
    grid = list(vq_model.grid) if vq_model.grid is not None else None
    # refuse bad sizes before the run folder is claimed
    model_kwargs = dict(num_clusters=num_clusters, vocab=vq_model.vocab_size, tokens=vq_model.num_tokens, grid=grid,
                        dim=dim, n_layer=n_layer, n_head=n_head, num_classes=len(CLASS_NAMES), dropout=dropout,
                        temperature=temperature, restrict=restrict, kmeans_seed=kmeans_seed, normalized=normalize,
                        class_dropout_prob=class_dropout)
    check_trainable_size(lambda: CTFRefiner(**model_kwargs), "this refiner")
    check_batch_size(training_items(limit, flip, data_root), batch_size)
    accelerator = make_accelerator()
    out = claim_run_dir(out, resume, accelerator.is_main_process)

    t_prep = time.time()
    images, labels, codes = training_codes(vq_model, vq_dir, out, accelerator, codes_cache, flip, limit, progress,
                                           data_root)
    prep_s = time.time() - t_prep
    num_items = len(codes)
    if epochs is not None:
        steps = max(1, math.ceil(epochs * (num_items // (batch_size * accelerator.num_processes))))
    cfg = TrainConfig(out=str(out), steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                      weight_decay=weight_decay, ema_decay=ema_decay, grad_clip=grad_clip, seed=seed,
                      ckpt_every=ckpt_every, log_every=log_every, resume=resume, progress=progress)
    torch.manual_seed(seed)
    model = CTFRefiner(**model_kwargs).set_clusters(c2c)
    seed_everything(seed + accelerator.process_index)
    dataset = CodeBatches(codes, labels, images, "c2i", seed)

    def loss_fn(m, batch):
        loss = m.loss(batch["codes"], batch["labels"])
        return loss, {"loss": loss}

    run_info = {"kind": "ctf-refiner", "vq": str(vq), "vq_hash": _weights_hash(vq_dir),
                "refiner_config": {k: v for k, v in model.config.items() if not k.startswith("_")},
                "code_to_cluster_sum": int((c2c * torch.arange(len(c2c))).sum()),
                "parameters": model.num_parameters(), "train_items": num_items, "flip": flip,
                "command": command, "prep_s": round(prep_s, 1), "threads": torch.get_num_threads()}
    trainer = Trainer(cfg, model, dataset, loss_fn, num_items=num_items, loss_names=["loss"],
                      accelerator=accelerator, run_info=run_info, tokens_per_item=vq_model.num_tokens)
    trainer.fit(stop_at=stop_at_step)
    if not trainer.finished:
        return {"stopped_at": trainer.step}

    metrics = {}
    if trainer.is_main:
        ema = trainer.ema_model()
        folder = out / "model"
        test_images, test_labels = load_fashion_mnist("test", data_root)
        n_test = min(eval_items, len(test_labels))
        test_codes = encode_images(vq_model, test_images[:n_test]).long()
        test_labels = test_labels[:n_test].long()
        metrics = {"step": trainer.step, "train_wall_s": round(trainer.elapsed, 1), "prep_s": round(prep_s, 1),
                   "final_train_losses": trainer.last_losses, "parameters": model.num_parameters(),
                   "test_items": n_test, "test_fp32": refiner_test_metrics(ema, test_codes, test_labels)}
        dtype = torch.float32 if export_dtype == "float32" else torch.float16
        ema.save_pretrained(folder, dtype=dtype)
        if export_dtype != "float32":
            half = CTFRefiner.from_pretrained(folder).float()
            metrics["test_fp16_export"] = refiner_test_metrics(half, test_codes, test_labels)
            if export_dtype == "auto" and metrics["test_fp16_export"]["loss"] - metrics["test_fp32"]["loss"] > 0.002:
                ema.save_pretrained(folder, dtype=torch.float32)
                dtype = torch.float32
        metrics["export_dtype"] = str(dtype).replace("torch.", "")
        write_json(out / "metrics.json", {**metrics, "train_config": cfg.to_dict(), "run": run_info})
        write_json(folder / "metrics.json", {**metrics, "train_config": cfg.to_dict(), "run": run_info})
        list_in_marker(folder, ["metrics.json"])
    accelerator.wait_for_everyone()
    return metrics


@torch.no_grad()
def refiner_test_metrics(model: CTFRefiner, codes: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> dict:
    """Teacher-forced CE (nats/code) and argmax accuracy given ground-truth coarse labels, plus the
    accuracy when the argmax is restricted to each position's cluster (what sampling can use)."""
    model.eval()
    loss, correct, correct_r = 0.0, 0, 0
    for s in range(0, len(codes), batch_size):
        x, c = codes[s:s + batch_size], labels[s:s + batch_size]
        coarse = model.codes_to_coarse(x)
        logits = model(coarse, c)
        loss += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="sum"))
        correct += int((logits.argmax(-1) == x).sum())
        correct_r += int((model.restricted(logits, coarse).argmax(-1) == x).sum())
    n = codes.numel()
    return {"loss": loss / n, "accuracy": correct / n, "accuracy_restricted": correct_r / n}


def check_refiner_matches(refiner, vq_model: ImageTokenizer, where: str) -> None:
    if refiner.vocab_size != vq_model.vocab_size or refiner.num_tokens != vq_model.num_tokens:
        raise ArgenError(f"{where}: the refiner writes {refiner.num_tokens} codes of vocabulary {refiner.vocab_size}, "
                         f"the tokenizer takes {vq_model.num_tokens} of {vq_model.vocab_size}")
