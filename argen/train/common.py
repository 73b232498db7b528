"""Pieces every training loop here shares: schedule, EMA, deterministic data order, checkpoints, logs.

The loops are plain PyTorch driven through `accelerate.Accelerator`, so the same code runs on
this CPU (`python -m argen train ...`) and on many GPUs or machines (`accelerate launch -m
argen.cli.main train ...`) unchanged. `--batch-size` is the batch of one process; the global
batch is batch_size x num_processes.

Exact resume. A checkpoint holds everything the next step depends on: model, EMA, optimizer and
LR-scheduler state, the step counter, the RNG states of python/numpy/torch of every process, and
any extra tensors a loop keeps (e.g. the tokenizer's codebook-usage counters). The data order is
not state at all but a pure function of (seed, epoch): global batch b of a run is always the same
items, so a resumed run simply starts its sampler at the next batch. A run stopped after k steps
and resumed therefore reaches bit-identical weights to an uninterrupted run (tests/test_train.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from ..atomic import atomic_directory_write, atomic_write_json, atomic_write_text
from ..distributed import gather_objects, make_accelerator
from ..errors import ArgenError
from ..progress import progress
from .rundir import read_state

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
LOG_NAME = "log.csv"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Hyper-parameters of the optimisation loop (the model's own live in its config)."""

    out: str
    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.05  # on matrices/conv kernels only, as LlamaGen
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 25
    resume: bool = False
    progress: bool = True
    # Keys a resumed run must agree on with the checkpoint (anything that changes the trajectory).
    RESUME_KEYS = ("steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip",
                   "ema_decay", "seed")

    def __post_init__(self):
        if self.steps < 1:
            raise ArgenError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ArgenError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ArgenError(f"learning rate must be positive, got {self.lr}")
        if self.ckpt_every < 1 or self.log_every < 1:
            raise ArgenError("ckpt_every and log_every must be at least 1")
        if not 0 <= self.ema_decay < 1:
            raise ArgenError(f"ema decay must be in [0, 1), got {self.ema_decay}")
        self.betas = tuple(self.betas)
        self.warmup_steps = min(self.warmup_steps, self.steps)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def set_threads(threads: Optional[int]) -> None:
    """Limit intra-op CPU threads (None: leave torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ArgenError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# LR schedule


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Multiplier for LambdaLR: linear warmup from 1/warmup to 1, then cosine down to `min_ratio`.

    LambdaLR calls it with the number of optimizer steps taken so far (0 before the first).
    """

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                   no_decay: Optional[Callable[[str], bool]] = None) -> torch.optim.AdamW:
    """AdamW; weight decay on tensors with dim >= 2 only (LlamaGen's `configure_optimizers`),
    except parameters whose name `no_decay(name)` flags."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    skip = no_decay or (lambda name: False)
    decay = [p for n, p in named if p.dim() >= 2 and not skip(n)]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and not skip(n))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def make_scheduler(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))


# --------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers).

    A small class rather than `diffusers.training_utils.EMAModel` because (1) EMAModel tracks
    parameters only, as an unnamed list, while here the EMA must be a named state dict that
    goes straight into safetensors checkpoints and `load_state_dict` of the exported model;
    (2) buffers (e.g. the tokenizer's `codebook_used`) should follow the live model, which a
    state-dict EMA gets for free. Decay warms up as min(decay, (1 + n) / (10 + n)) like
    EMAModel's default, so early weights are not dominated by the random init.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._param_names = {name for name, _ in model.named_parameters()}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if name in self._param_names and value.is_floating_point():
                shadow.lerp_(value.detach(), 1.0 - decay)
            else:
                shadow.copy_(value)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict, num_updates: int) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ArgenError(f"EMA checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        for name, value in state.items():
            if name in self.shadow:
                self.shadow[name].copy_(value)
        self.num_updates = num_updates

    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        model.load_state_dict(self.shadow)
        return model


# --------------------------------------------------------------------------------------------
# Deterministic data order


def check_batch_size(num_items: int, batch_size: int) -> None:
    """One batch must fit in the training set. The trainers call this before they claim the run folder
    (and before a GPT or refiner run encodes its training set), so a refusal leaves nothing behind."""
    if num_items < batch_size:
        raise ArgenError(f"the dataset has {num_items} items, fewer than one batch of {batch_size}")


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The item order of `epoch`: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) * 7_919 + 12_345)
    return torch.randperm(num_items, generator=g)


class StepBatchSampler(Sampler):
    """Yields batches [(epoch, index), ...] for batch numbers start..stop-1 of an endless stream.

    Batch b takes items epoch_permutation(...)[b_in_epoch * bs : ...] of epoch b // batches_per_epoch
    (the last partial batch of an epoch is dropped). With several processes accelerate's
    `BatchSamplerShard` hands batch b to process b % num_processes, so global step s uses batches
    s*P .. s*P+P-1 and a resumed run starts at start = step * P.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int):
        check_batch_size(num_items, batch_size)
        self.num_items = num_items
        self.batch_size = batch_size
        self.drop_last = True
        self.seed = seed
        self.start = start
        self.stop = stop
        self.batches_per_epoch = num_items // batch_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        epoch, perm = None, None
        for b in range(self.start, self.stop):
            e, j = divmod(b, self.batches_per_epoch)
            if e != epoch:
                epoch, perm = e, epoch_permutation(self.num_items, self.seed, e)
            idx = perm[j * self.batch_size:(j + 1) * self.batch_size].tolist()
            yield [(e, i) for i in idx]


# --------------------------------------------------------------------------------------------
# RNG state (JSON-able python/numpy, tensor for torch)


def capture_rng() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])


# --------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_root(out) -> Path:
    return Path(out) / CHECKPOINT_DIR


def list_checkpoints(out) -> list[Path]:
    """Complete checkpoints under <out>/checkpoints, oldest first."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file():
            try:
                found.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(out) -> Optional[Path]:
    ckpts = list_checkpoints(out)
    return ckpts[-1] if ckpts else None


class CSVLog:
    """`<out>/log.csv`: one row per log interval. Rows are appended with one write(2) each
    (O_APPEND), so a killed run never leaves half a row; on resume, rows past the checkpoint's
    step are dropped (rewritten atomically) so the log continues exactly where the state does."""

    def __init__(self, path: Path, columns: list[str]):
        self.path = Path(path)
        self.columns = columns

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        if not lines:
            return
        keep = [lines[0]]
        for line in lines[1:]:
            try:
                if int(line.split(",", 1)[0]) <= step:
                    keep.append(line)
            except ValueError:
                continue
        atomic_write_text(self.path, "\n".join(keep) + "\n")

    def append(self, row: dict) -> None:
        text = ""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            text += ",".join(self.columns) + "\n"
        values = []
        for c in self.columns:
            v = row.get(c, "")
            values.append(f"{v:.6g}" if isinstance(v, float) else str(v))
        text += ",".join(values) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def read_log(path) -> list[dict]:
    """Rows of a log.csv as dicts of floats (for model cards and tests)."""
    lines = Path(path).read_text().splitlines()
    if not lines:
        return []
    head = lines[0].split(",")
    rows = []
    for line in lines[1:]:
        values = line.split(",")
        rows.append({k: (float(v) if v not in ("", "nan") else float("nan")) for k, v in zip(head, values)})
    return rows


# --------------------------------------------------------------------------------------------
# The loop


LossFn = Callable[[torch.nn.Module, dict], tuple]


class Trainer:
    """Runs `loss_fn(model, batch) -> (loss, {name: scalar tensor})` for cfg.steps optimizer steps.

    model: built (and seeded) by the caller. dataset: indexable by (epoch, index) keys through
    `__getitems__(keys) -> batch` (any collatable structure). extra_state: named tensors the
    caller mutates during training (saved/restored with checkpoints). after_step(trainer, batch,
    aux) runs after every optimizer step (e.g. codebook restarts); it may use the torch RNG.
    extra_modules: named objects with `state_dict()` / `load_state_dict(state)` that the loss
    function trains itself (e.g. a GAN's discriminator and its optimizer); saved in checkpoints
    with the optimizer (tensors and plain values only: they load with weights_only=True).
    """

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, dataset, loss_fn: LossFn, *,
                 num_items: int, loss_names: list[str], extra_state: Optional[dict] = None,
                 after_step: Optional[Callable] = None, accelerator=None, run_info: Optional[dict] = None,
                 tokens_per_item: int = 0, no_decay: Optional[Callable[[str], bool]] = None,
                 extra_modules: Optional[dict] = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.accelerator = accelerator or make_accelerator()
        self.loss_fn = loss_fn
        self.loss_names = list(loss_names)
        self.dataset = dataset
        self.num_items = num_items
        self.extra_state = extra_state if extra_state is not None else {}
        self.after_step = after_step
        self.extra_modules = extra_modules or {}
        self.run_info = run_info or {}
        self.tokens_per_item = tokens_per_item
        self.step = 0
        self.elapsed = 0.0  # wall seconds spent training, summed over sessions
        self.last_losses: dict = {}

        acc = self.accelerator
        self.optimizer = make_optimizer(model, cfg, no_decay)
        # The scheduler is stepped by hand (not through accelerator.prepare): accelerate's
        # wrapper steps it num_processes times per step, which would make the schedule depend
        # on the number of processes.
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.model, self.optimizer = acc.prepare(model, self.optimizer)
        self.ema = EMA(self.unwrapped, cfg.ema_decay)
        self._rng_to_restore = None

        existing = latest_checkpoint(self.out)
        if existing is not None and not cfg.resume:
            raise ArgenError(f"{self.out} already holds checkpoints (latest {existing.name}): pass --resume to "
                             "continue that run, or choose another --out")
        if existing is not None:
            self._load(existing)

    # ---- helpers --------------------------------------------------------------------------

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def epoch(self) -> float:
        """Epochs done (fractional): batches consumed / batches per epoch."""
        batches_per_epoch = self.num_items // self.cfg.batch_size
        return self.step * self.accelerator.num_processes / max(1, batches_per_epoch)

    @property
    def finished(self) -> bool:
        return self.step >= self.cfg.steps

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> Optional[Path]:
        acc = self.accelerator
        rng_all = gather_objects(capture_rng(), acc.num_processes)
        target = checkpoint_root(self.out) / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        if self.is_main:
            model_state = {k: v.detach().contiguous().cpu() for k, v in self.unwrapped.state_dict().items()}
            ema_state = {k: v.detach().contiguous().cpu() for k, v in self.ema.state_dict().items()}
            extra = {k: v.detach().contiguous().cpu() for k, v in self.extra_state.items()}
            for rank, rng in enumerate(rng_all):
                extra[f"__rng_torch_{rank}"] = rng["torch"]
            meta = {
                "step": self.step,
                "elapsed": self.elapsed,
                "ema_updates": self.ema.num_updates,
                "num_processes": acc.num_processes,
                "train_config": self.cfg.to_dict(),
                "run_info": self.run_info,
                "last_losses": self.last_losses,
                "rng": [{"python": r["python"], "numpy": r["numpy"]} for r in rng_all],
            }

            def write(tmp: Path):
                save_file(model_state, str(tmp / "model.safetensors"))
                save_file(ema_state, str(tmp / "ema.safetensors"))
                save_file(extra, str(tmp / "extra.safetensors"))
                modules = {name: m.state_dict() for name, m in self.extra_modules.items()}
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            **({"extra_modules": modules} if modules else {})}, tmp / "optimizer.pt")
                (tmp / "state.json").write_text(json.dumps(meta, indent=1))

            atomic_directory_write(target, write)
            for old in list_checkpoints(self.out)[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return target

    # run_info entries that describe the run, not what is trained (may differ on resume).
    VOLATILE_RUN_KEYS = ("command", "prep_s", "threads")

    def _load(self, ckpt: Path) -> None:
        acc = self.accelerator
        meta = read_state(ckpt)  # a corrupt state.json is a one-line error
        saved = meta["train_config"]
        for key in TrainConfig.RESUME_KEYS:
            mine = getattr(self.cfg, key)
            if saved.get(key) != mine:
                raise ArgenError(f"cannot resume {ckpt}: it was trained with {key}={saved.get(key)!r}, "
                                 f"this run asks for {mine!r} (use the same settings or another --out)")
        saved_run, my_run = meta.get("run_info", {}), json.loads(json.dumps(self.run_info, default=str))
        for key in sorted(set(saved_run) | set(my_run)):
            if key not in self.VOLATILE_RUN_KEYS and saved_run.get(key) != my_run.get(key):
                raise ArgenError(f"cannot resume {ckpt}: it was trained with a different {key} "
                                 f"({_short(saved_run.get(key))} vs {_short(my_run.get(key))}); "
                                 "use the same model/data settings or another --out")
        if meta["num_processes"] != acc.num_processes:
            raise ArgenError(f"cannot resume {ckpt}: it ran on {meta['num_processes']} processes, this run has "
                             f"{acc.num_processes} (the data order depends on it)")
        try:
            model_state = load_file(str(ckpt / "model.safetensors"))
            ema_state = load_file(str(ckpt / "ema.safetensors"))
            extra = load_file(str(ckpt / "extra.safetensors"))
            opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
            raise ArgenError(f"checkpoint {ckpt} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                             "delete it to resume from the previous one") from None
        self.unwrapped.load_state_dict(model_state)
        self.ema.load_state_dict(ema_state, meta["ema_updates"])
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        for name, module in self.extra_modules.items():
            if name not in opt.get("extra_modules", {}):
                raise ArgenError(f"checkpoint {ckpt} lacks training state {name!r}")
            module.load_state_dict(opt["extra_modules"][name])
        for name, tensor in self.extra_state.items():
            if name not in extra:
                raise ArgenError(f"checkpoint {ckpt} lacks training state {name!r}")
            tensor.copy_(extra[name])
        self.step = int(meta["step"])
        self.elapsed = float(meta["elapsed"])
        self.last_losses = meta.get("last_losses", {})
        rank = acc.process_index
        self._rng_to_restore = {**meta["rng"][rank], "torch": extra[f"__rng_torch_{rank}"]}
        if self.is_main:
            print(f"resuming from {ckpt} (step {self.step}/{self.cfg.steps})", file=sys.stderr)

    # ---- training ---------------------------------------------------------------------------

    def _dataloader(self):
        acc = self.accelerator
        P = acc.num_processes
        sampler = StepBatchSampler(self.num_items, self.cfg.batch_size, self.cfg.seed,
                                   start=self.step * P, stop=self.cfg.steps * P)
        loader = DataLoader(_KeyDataset(self.dataset), batch_sampler=sampler, collate_fn=_identity,
                            num_workers=0, generator=torch.Generator())
        return acc.prepare(loader)

    def fit(self, stop_at: Optional[int] = None) -> None:
        """Train until cfg.steps (a no-op when a finished run is resumed).

        `stop_at`: leave the loop once this step is reached, as if the process had been killed
        there (tests of exact resume use it with a checkpoint at that step).
        """
        cfg, acc = self.cfg, self.accelerator
        log = CSVLog(self.out / LOG_NAME, ["step", "epoch", *self.loss_names, "lr", "grad_norm", "elapsed_s",
                                           "items_per_s", "tokens_per_s"])
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            log.truncate_after(self.step)
            atomic_write_text(self.out / "train_config.json", json.dumps(
                {"train": cfg.to_dict(), "run": self.run_info, "num_processes": acc.num_processes}, indent=1))
        if self.finished:
            return
        loader = self._dataloader()
        iterator = iter(loader)
        # Restore RNG only now: creating iterators may draw from the global generator.
        if self._rng_to_restore is not None:
            restore_rng(self._rng_to_restore)
            self._rng_to_restore = None
        show = cfg.progress and self.is_main
        if sys.stderr.isatty() or not show:
            bar = tqdm(total=cfg.steps, initial=self.step, disable=not show, desc=f"train {self.out.name}",
                       dynamic_ncols=True, mininterval=1.0)
        else:  # a log file: a plain line every few seconds (steps of this session)
            bar = progress(total=cfg.steps - self.step, desc=f"train {self.out.name} from step {self.step}",
                           unit="steps")
        sums = {k: 0.0 for k in self.loss_names}
        count, window_start, grad_norm = 0, time.time(), float("nan")
        session_start = time.time() - self.elapsed
        self.model.train()
        for batch in iterator:
            loss, parts, aux = self._forward(batch)
            acc.backward(loss)
            if cfg.grad_clip and cfg.grad_clip > 0:
                grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update(self.unwrapped)
            self.step += 1
            if self.after_step is not None:
                self.after_step(self, batch, aux)
            for k in self.loss_names:
                sums[k] += float(parts[k])
            count += 1
            self.elapsed = time.time() - session_start
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.finished:
                means = torch.tensor([sums[k] / count for k in self.loss_names])
                means = acc.reduce(means, reduction="mean") if acc.num_processes > 1 else means
                self.last_losses = {k: float(v) for k, v in zip(self.loss_names, means)}
                dt = max(1e-9, time.time() - window_start)
                items = count * cfg.batch_size * acc.num_processes
                row = {"step": self.step, "epoch": round(self.epoch, 4), **self.last_losses, "lr": self.lr(),
                       "grad_norm": grad_norm, "elapsed_s": round(self.elapsed, 1), "items_per_s": round(items / dt, 2),
                       "tokens_per_s": round(items * self.tokens_per_item / dt, 1)}
                if self.is_main:
                    log.append(row)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix({k: f"{v:.4f}" for k, v in self.last_losses.items()}, refresh=False)
                sums = {k: 0.0 for k in self.loss_names}
                count, window_start = 0, time.time()
            if self.step % cfg.ckpt_every == 0 or self.finished:
                self.save_checkpoint()
            if stop_at is not None and self.step >= stop_at:
                break
        bar.close()

    def _forward(self, batch):
        out = self.loss_fn(self.model, batch)
        loss, parts = out[0], out[1]
        aux = out[2] if len(out) > 2 else None
        return loss, {k: v.detach() for k, v in parts.items()}, aux

    # ---- export -------------------------------------------------------------------------------

    def ema_model(self) -> torch.nn.Module:
        """A copy of the model holding the EMA weights, in eval mode."""
        model = copy.deepcopy(self.unwrapped)
        self.ema.copy_to(model)
        return model.eval()


def _identity(batch):
    return batch


class _KeyDataset(torch.utils.data.Dataset):
    """Lets a DataLoader hand (epoch, index) keys of a whole batch to dataset.__getitems__."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitems__(self, keys):
        return self.dataset.__getitems__(keys)

    def __getitem__(self, key):
        return self.dataset.__getitems__([key])

    def __len__(self):
        return len(self.dataset)


def export_pretrained(model, folder, dtype=torch.float16, extra_files: Optional[dict] = None) -> Path:
    """`model.save_pretrained(folder, dtype)`; returns the folder."""
    model.save_pretrained(folder, dtype=dtype, extra_files=extra_files)
    return Path(folder)


def check_run_args(steps, epochs, export_dtype: str, **limits) -> None:
    """The argument checks every training entry point shares; `limits` are item counts
    (name=value, None = no limit) that must leave at least 2 items (one for a test split)."""
    if (steps is None) == (epochs is None):
        raise ArgenError("give exactly one of --steps or --epochs")
    if export_dtype not in ("auto", "float16", "float32"):
        raise ArgenError(f"export dtype must be auto, float16 or float32, got {export_dtype!r}")
    for name, value in limits.items():
        if value is not None and value < 2:
            raise ArgenError(f"--{name.replace('_', '-')} must be at least 2 items, got {value}")


#: Bytes of training state per parameter: float32 weights, gradients, Adam's two moments and the EMA copy.
TRAINING_BYTES_PER_PARAMETER = 20


def check_trainable_size(build: Callable[[], torch.nn.Module], what: str) -> None:
    """Refuse, in one line and before any data is prepared, a model whose training state cannot fit in
    this machine's memory. Without it an absurd width (`--dim 100000000`) passed every check, encoded the
    training set for minutes and then died in a raw allocator traceback. `build` runs on the meta device:
    nothing is allocated."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in build().parameters())
    need = parameters * TRAINING_BYTES_PER_PARAMETER
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        raise ArgenError(f"{what} has {parameters:,} parameters: training it needs about {need / 2**30:,.0f} GiB "
                         f"(weights, gradients, Adam moments and EMA in float32), and this machine has "
                         f"{memory / 2**30:,.0f} GiB; choose a smaller model")


def _short(value, limit: int = 120) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def write_json(path, data) -> None:
    atomic_write_json(path, data, indent=1, default=float)


@contextlib.contextmanager
def eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
