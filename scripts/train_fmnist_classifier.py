"""Train the Fashion-MNIST classifier that argen's offline evaluation uses as its feature network.

    python scripts/train_fmnist_classifier.py            # writes argen/assets/fmnist-classifier/

Seeded and CPU-only: with the same seed, thread count and torch build the run is repeatable.
Augmentation is deliberately light - a random shift of up to 1 pixel (a random 28x28 crop
of the image padded with background to 30x30) and a horizontal flip (Fashion-MNIST garments
are left/right symmetric, so the label does not change). A first run with 2-pixel shifts and
dropout 0.3 underfit in 8 epochs (final train loss 0.20, test 92.3%), so regularisation is
kept low for this short budget. AdamW with a per-step cosine schedule and a
short linear warm-up. Within a run, test accuracy is measured once, after the last epoch
(no early stopping or checkpoint picking on it); the only use of a test result was the one
change of settings after that first run.

The output folder gets ``config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers'
``save_pretrained``) and ``MODEL_CARD.md`` with the command, settings and results.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import platform
import shlex
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python scripts/...` puts scripts/, not the repo, on sys.path
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from argen.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist, to_model_range  # noqa: E402
from argen.eval.fmnist_classifier import ASSET_DIR, FMNISTClassifier  # noqa: E402

MAX_WEIGHTS_BYTES = 2 * 1024 * 1024
SHIFT = 1  # maximum shift in pixels


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ASSET_DIR, help="output folder (default: the shipped asset folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=200)
    # One thread by default: on a shared 2-core machine, 2 OpenMP threads ran 4x *slower*
    # per step than 1 while another job held a core (the threads spin waiting for each other).
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args(argv)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to SHIFT pixels and random horizontal flip of a batch [B, 1, 28, 28]."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT), value=-1.0)  # -1 = background
    oy = torch.randint(0, 2 * SHIFT + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * SHIFT + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [B, H, 1]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # [B, 1, W]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to 0 at ``total`` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def predict(model: FMNISTClassifier, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch]).argmax(dim=1) for i in range(0, len(images), batch)])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_card(out: Path, args, command: str, stats: dict) -> None:
    weights = out / "diffusion_pytorch_model.safetensors"
    per_class = "\n".join(
        f"| {i} | {name} | {acc * 100:.1f}% |" for i, (name, acc) in enumerate(zip(CLASS_NAMES, stats["per_class"]))
    )
    losses = ", ".join(f"{loss:.4f}" for loss in stats["epoch_losses"])
    card = f"""# Fashion-MNIST classifier (argen evaluation network)

A small CNN trained on the Fashion-MNIST **train** split (60,000 images) and used by
`argen.eval` as the feature network for offline evaluation of Fashion-MNIST generators:
FID on its 128-d penultimate features (`features()`), IS on its softmax (`probs()`,
so IS <= 10), and class accuracy of class-conditional samples (`forward()` logits).
It is not an Inception network: numbers computed with it are only comparable with other
numbers computed with this same checkpoint (sha256 below).

## Results

| | |
|---|---|
| Test accuracy (10,000 test images) | **{stats['test_acc'] * 100:.2f}%** |
| Test accuracy, first 2,000 test images | {stats['test_acc_2000'] * 100:.2f}% |
| Final train loss (mean over the last epoch, augmented batches) | {stats['epoch_losses'][-1]:.4f} |
| Train loss per epoch | {losses} |
| Wall time (training + evaluation) | {stats['wall_s']:.0f} s ({stats['wall_s'] / 60:.1f} min) on {args.threads} CPU thread(s) |

Per-class test accuracy:

| id | class | accuracy |
|---|---|---|
{per_class}

## Use

```python
from argen.eval.fmnist_classifier import load_fmnist_classifier
clf = load_fmnist_classifier()            # this folder, eval mode
feats = clf.features(images)              # [B, 128]; images float [B, 1, 28|32, 28|32] in [-1, 1]
probs = clf.probs(images)                 # [B, 10]
```

Input is float in [-1, 1] with background -1 (`argen.data.fashion_mnist.to_model_range`).
32x32 images (the generators' 28x28 + 2 px background padding) are center-cropped to 28x28
inside the model; other sizes are rejected.

## Model

- Architecture: 3 x [conv3x3 -> BatchNorm -> ReLU -> maxpool2] with widths {list(stats['config']['channels'])}
  (28 -> 14 -> 7 -> 3), flatten, linear -> BatchNorm -> ReLU = 128-d features, dropout
  {stats['config']['dropout']}, linear -> 10 logits.
- Parameters: {stats['params']:,}; weights file `diffusion_pytorch_model.safetensors`
  ({weights.stat().st_size:,} bytes, float32), sha256 `{sha256(weights)}`.
- Saved with diffusers `ModelMixin.save_pretrained` (`config.json` + safetensors); load with
  `FMNISTClassifier.from_pretrained(folder)`.

## Training

- Command (from the repository root):

  ```
  {command}
  ```

- Data: Fashion-MNIST train split from the Debian package `dataset-fashion-mnist`
  (`/usr/share/datasets/fashion-mnist`, read by `argen.data.fashion_mnist.load_fashion_mnist`).
  Within this run the test split was used only for the final evaluation above (see History).
- Seed {args.seed} (`torch.manual_seed` and a dedicated generator for shuffling and
  augmentation); {args.epochs} epochs, batch size {args.batch_size}, {stats['steps']} steps.
- Augmentation: random shift of up to {SHIFT} px (random 28x28 crop of the image padded to
  {28 + 2 * SHIFT}x{28 + 2 * SHIFT} with background) and horizontal flip with probability 0.5.
- Optimizer: AdamW (lr {args.lr:g}, weight decay {args.weight_decay:g}, betas (0.9, 0.999)),
  linear warm-up over {args.warmup_steps} steps then cosine decay to 0, per step; cross-entropy loss.
- Environment: torch {torch.__version__}, Python {platform.python_version()}, CPU, {args.threads} thread(s).
  Repeatable for the same seed, thread count and torch build; other builds may differ in the
  last digits of the loss and by a few test images.
- History: an earlier run (8 epochs, 2 px shifts, dropout 0.3) underfit and reached 92.3% test
  accuracy; epochs, shift and dropout were changed once after seeing that. No other choice
  was made on the test split. Both runs shared the 2-core machine with other training jobs:
  about 160 s per epoch instead of about 105 s alone, so expect roughly 20 min on an idle core.
"""
    (out / "MODEL_CARD.md").write_text(card)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python scripts/train_fmnist_classifier.py" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()

    train_u8, train_labels = load_fashion_mnist("train")
    test_u8, test_labels = load_fashion_mnist("test")
    train_x = to_model_range(train_u8).unsqueeze(1)  # [60000, 1, 28, 28] in [-1, 1]
    test_x = to_model_range(test_u8).unsqueeze(1)

    model = FMNISTClassifier().to(memory_format=torch.channels_last)  # ~30% faster convs on CPU
    params = sum(p.numel() for p in model.parameters())
    print(f"FMNISTClassifier: {params:,} parameters; {len(train_x):,} train images; "
          f"{args.epochs} epochs on {args.threads} thread(s)", flush=True)
    # No weight decay on BatchNorm scales/shifts and biases (1-D tensors): decaying them only
    # fights the normalisation.
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)

    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total = steps_per_epoch * args.epochs
    step = 0
    epoch_losses = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        loss_sum, seen, t0 = 0.0, 0, time.time()
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            x = augment(train_x[idx], gen).contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.lr, args.warmup_steps)
            loss = F.cross_entropy(model(x), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
        epoch_losses.append(loss_sum / seen)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {epoch_losses[-1]:.4f} "
              f"({time.time() - t0:.0f} s, {time.time() - start:.0f} s total)", flush=True)

    pred = predict(model, test_x)
    correct = pred == test_labels
    per_class = [correct[test_labels == c].float().mean().item() for c in range(len(CLASS_NAMES))]
    stats = {
        "test_acc": correct.float().mean().item(),
        "test_acc_2000": correct[:2000].float().mean().item(),
        "per_class": per_class,
        "epoch_losses": epoch_losses,
        "params": params,
        "steps": total,
        "config": dict(model.config),
    }

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors only
    model.save_pretrained(args.out, safe_serialization=True)
    weights = args.out / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise SystemExit(f"weights are {size:,} bytes, over the {MAX_WEIGHTS_BYTES:,}-byte budget; shrink the model")

    # Round-trip check: what ships must load and predict exactly what was just evaluated.
    reloaded = FMNISTClassifier.from_pretrained(args.out, local_files_only=True)
    if not torch.equal(predict(reloaded, test_x), pred):
        raise SystemExit("reloaded model predicts differently from the trained one; not shipping it")

    stats["wall_s"] = time.time() - start
    write_card(args.out, args, command, stats)
    print(f"test accuracy {stats['test_acc'] * 100:.2f}% (first 2000: {stats['test_acc_2000'] * 100:.2f}%); "
          f"per class: " + ", ".join(f"{a * 100:.1f}" for a in per_class))
    print(f"saved to {args.out} ({size:,} bytes of weights) in {stats['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
