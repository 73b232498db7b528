"""Generate N evaluation samples: per-sample seeds, resumable, split over processes.

Layout of an output folder ``OUT``::

    OUT/sampling.json     the run's settings (model fingerprint, sampler, guidance, seed, conditions)
    OUT/samples.jsonl     one line per image: {"index", "seed", "label", "prompt"}
    OUT/samples/000000.png ... image i, written atomically (temporary file + os.replace)

Image ``i`` is sampled with seed ``seed + i`` and condition ``i``: class ``i % num_classes``
for class-conditional models (class-balanced), prompt ``i % len(prompts)`` for
text-to-image models (default: argen's held-out Fashion-MNIST prompts, class ``i % 10``).
Samplers draw from per-sample random streams and each image is decoded on its own, so
image ``i`` does not depend on the batch size or on the number of processes.

Resuming: a PNG appears only complete (atomic rename), so a killed run restarts by skipping
every existing ``NNNNNN.png`` and generating exactly the missing ones; stale temporary files
are removed. ``sampling.json`` must match (apart from ``num_samples``, which may grow), so
a resumed run cannot mix images from different settings.

Distribution: under ``accelerate launch`` / ``torchrun`` (any ``accelerate.PartialState``),
the indices are cut into blocks of ``batch_size`` and process ``r`` of ``W`` samples the blocks
``k % W == r`` (so every batch holds the same images whatever W is); the images are gathered
through the folder.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from argen.atomic import atomic_write_text
from argen.errors import ArgenError

__all__ = ["PlanItem", "make_plan", "read_prompt_file", "default_prompts", "generate_samples", "read_plan",
           "sample_path", "png_complete", "RUN_FILE", "PLAN_FILE", "SAMPLES_DIR", "model_fingerprint",
           "check_eval_dir", "claim_eval_dir", "EVAL_KIND"]

RUN_FILE = "sampling.json"
PLAN_FILE = "samples.jsonl"
SAMPLES_DIR = "samples"
_PNG_END = b"IEND\xaeB`\x82"


@dataclass
class PlanItem:
    """What image ``index`` is: its seed, class label (None if unknown) and prompt (t2i)."""

    index: int
    seed: int
    label: Optional[int]
    prompt: Optional[str] = None


# --------------------------------------------------------------------------- conditions


def default_prompts() -> List[tuple]:
    """argen's held-out prompts as ``(prompt, fashion-mnist label)``, ordered so that entry j has
    class ``j % 10`` (cycling through each class's prompts)."""
    from argen.data.captions import HELDOUT_PROMPTS

    classes = sorted(HELDOUT_PROMPTS)
    per_class = min(len(v) for v in HELDOUT_PROMPTS.values())
    return [(HELDOUT_PROMPTS[classes[j % len(classes)]][j // len(classes)], classes[j % len(classes)])
            for j in range(per_class * len(classes))]


def read_prompt_file(path) -> List[tuple]:
    """``[(prompt, label or None)]`` from a text file (one prompt per line) or a ``.jsonl`` file
    of ``{"prompt": ..., "label": <Fashion-MNIST class id or name, optional>}``."""
    from argen.data.fashion_mnist import resolve_class

    path = Path(path).expanduser()
    if not path.is_file():
        raise ArgenError(f"prompt file {path} not found")
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ArgenError(f"prompt file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ArgenError(f"{path} line {number}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise ArgenError(f"{path} line {number}: expected {{\"prompt\": \"...\", \"label\": ...}}")
            label = record.get("label")
            out.append((record["prompt"], None if label is None else resolve_class(label)))
        else:
            out.append((line.strip(), None))
    if not out:
        raise ArgenError(f"prompt file {path} contains no prompts")
    return out


def make_plan(pipe, num_samples: int, seed: int = 0, prompts: Optional[Sequence[tuple]] = None):
    """``(items, conditions)``: one :class:`PlanItem` per image and a description of the
    conditions (recorded in sampling.json; ``label_space`` is "fashion-mnist" when the labels
    are Fashion-MNIST classes, so the fmnist classifier can score class accuracy)."""
    from argen.data.fashion_mnist import CLASS_NAMES

    if num_samples < 1:
        raise ArgenError(f"--num-samples must be >= 1, got {num_samples}")
    if pipe.is_text_to_image:
        given = prompts is not None
        prompts = list(prompts) if given else default_prompts()
        pipe.check_prompts(sorted({p for p, _ in prompts}))
        items = [PlanItem(i, seed + i, prompts[i % len(prompts)][1], prompts[i % len(prompts)][0])
                 for i in range(num_samples)]
        space = "fashion-mnist" if all(label is not None for _, label in prompts) else None
        import hashlib

        digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
        cond = {"type": "prompts", "source": "file" if given else "heldout", "num_prompts": len(prompts),
                "prompts_sha256": digest, "label_space": space}
        return items, cond
    if prompts is not None:
        raise ArgenError("this is a class-conditional model: it takes no prompt file")
    num_classes = pipe.generator.num_classes
    items = [PlanItem(i, seed + i, i % num_classes) for i in range(num_samples)]
    space = "fashion-mnist" if tuple(pipe.class_names) == CLASS_NAMES else None
    return items, {"type": "class-balanced", "num_classes": num_classes, "label_space": space}


def model_fingerprint(pipe, modules=None) -> str:
    """A cheap fingerprint of the generator + tokenizer weights (shapes, first values, sums);
    of `modules` instead when given."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for module in modules or (pipe.generator, pipe.refiner, pipe.tokenizer):
        if module is None:
            continue
        for key, value in sorted(module.state_dict().items()):
            flat = value.detach().reshape(-1)
            digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
            if flat.numel():
                digest.update(flat[:256].to(torch.float64).cpu().numpy().tobytes())
                digest.update(np.float64(flat.to(torch.float64).sum().item()).tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- files


def sample_path(out_dir, index: int) -> Path:
    return Path(out_dir) / SAMPLES_DIR / f"{index:06d}.png"


def png_complete(path: Path) -> bool:
    """True for a file that ends with the PNG IEND chunk (a complete PNG)."""
    try:
        size = path.stat().st_size
        if size < 57:  # signature + IHDR + IDAT + IEND at the very least
            return False
        with open(path, "rb") as handle:
            handle.seek(size - len(_PNG_END))
            return handle.read() == _PNG_END
    except OSError:
        return False


def read_plan(out_dir) -> tuple[dict, List[PlanItem]]:
    """``(sampling.json settings, plan items)`` of an output folder."""
    out_dir = Path(out_dir)
    run_path, plan_path = out_dir / RUN_FILE, out_dir / PLAN_FILE
    if not run_path.is_file() or not plan_path.is_file():
        raise ArgenError(f"{out_dir} is not a sampling output folder (no {RUN_FILE} / {PLAN_FILE})")
    try:
        run = json.loads(run_path.read_text())
        items = [PlanItem(**json.loads(line)) for line in plan_path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, TypeError) as exc:
        raise ArgenError(f"{out_dir}: corrupt {RUN_FILE} or {PLAN_FILE} ({exc})") from None
    return run, items


def _check_resume(run_path: Path, settings: dict) -> None:
    if not run_path.is_file():
        return
    try:
        old = json.loads(run_path.read_text())
    except json.JSONDecodeError:
        raise ArgenError(f"{run_path} is corrupt; use a new --out folder") from None
    for key in sorted(set(old) | set(settings)):
        if key in ("num_samples", "batch_size", "argen_version", "model"):  # the fingerprint identifies the model
            continue
        if old.get(key) != settings.get(key):
            raise ArgenError(f"{run_path.parent} holds samples from a different run ({key}: {old.get(key)!r} there, "
                             f"{settings.get(key)!r} now); use a new --out folder or delete it")


EVAL_KIND = "eval-run"
_EVAL_NAMES = {RUN_FILE, PLAN_FILE, SAMPLES_DIR, "metrics.json", "samples.npz"}


def _legacy_eval_dir(out: Path) -> bool:
    """An output folder of an argen from before output folders carried a marker: its
    sampling.json is argen's and everything in it is a name a sampling run writes."""
    try:
        run = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(run, dict) and {"argen_version", "model_fingerprint"} <= set(run)
            and {p.name for p in out.iterdir()} <= _EVAL_NAMES)


def check_eval_dir(out, flag: str = "--out") -> Path:
    """An evaluation output folder checked before any work, writing nothing: absent, empty, or
    argen's own. A folder of someone else's images is refused: its images would otherwise be
    taken for samples of this run and scored."""
    from argen.atomic import _check_parent, folder_marker, is_argen_folder

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ArgenError(f"{flag} {str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (
            is_argen_folder(out, EVAL_KIND) or (folder_marker(out) is None and _legacy_eval_dir(out))):
        raise ArgenError(f"{flag} {str(out)!r} holds files that argen's evaluation did not write; "
                         "choose a new or empty folder")
    _check_parent(out / "x" if out.is_dir() else out, flag)
    return out


def claim_eval_dir(out) -> Path:
    """`check_eval_dir`, then mark the folder as argen's (an adopted legacy folder too)."""
    from argen.atomic import MARKER, SIGNATURE, atomic_write_json, claim_dir, folder_marker

    out = check_eval_dir(out)
    if out.is_dir() and folder_marker(out) is None and any(out.iterdir()):
        from argen import __version__

        atomic_write_json(out / MARKER, {SIGNATURE: __version__, "kind": EVAL_KIND})
    return claim_dir(out, EVAL_KIND)


# --------------------------------------------------------------------------- generation


def plan_conditions(pipe, items: Sequence[PlanItem]):
    """The pipeline's conditions for a block of plan items (class ids, or prompts)."""
    from argen.pipeline import Conditions

    if pipe.is_text_to_image:
        feats, mask = pipe.prompt_features([it.prompt for it in items])
        return Conditions(feats, mask, [it.label for it in items])
    return pipe.conditions(class_labels=[it.label for it in items])


def _rank_world(state) -> tuple[int, int]:
    if state is None:
        return 0, 1
    return int(state.process_index), int(state.num_processes)


def generate_samples(pipe, out_dir, num_samples: int, *, sampler="ar", sampler_options: Optional[dict] = None,
                     params=None, seed: int = 0, batch_size: int = 16, prompts: Optional[Sequence[tuple]] = None,
                     model_name: Optional[str] = None, state=None, log: Optional[Callable[[str], None]] = print,
                     on_saved: Optional[Callable[[int], None]] = None, num_tokens: Optional[int] = None) -> dict:
    """Write images ``0 .. num_samples-1`` into ``out_dir/samples`` (skipping complete ones).

    ``sampler``: a name for :func:`argen.samplers.get_sampler` (options in
    ``sampler_options``). ``params``: :class:`argen.samplers.SamplingParams` (default: the
    model's cfg_scale). ``state``: an ``accelerate.PartialState`` to split the work.
    ``on_saved(index)`` is called after each image is written (tests use it to simulate a kill).
    ``num_tokens``: sample and decode only the first n tokens (`ARPipeline.check_num_tokens`).

    Returns a summary for this process: ``generated`` (images written), ``skipped`` (already
    present), ``sampled`` (images sampled, including the present ones of a re-sampled block),
    ``nfe_per_image`` (mean forward passes per sampled image), ``seconds``, ``rank``, ``world_size``.
    """
    from argen.imageio import save_png_atomic
    from argen.pipeline import to_pil
    from argen.samplers import get_sampler

    if batch_size < 1:
        raise ArgenError(f"--batch-size must be >= 1, got {batch_size}")
    if params is None:
        params = pipe.sampling_params()
    options = dict(sampler_options or {})
    try:
        sampler_obj = get_sampler(sampler, **options)
    except TypeError as err:
        raise ArgenError(f"sampler {sampler!r} does not take these options: {err}") from None
    rank, world = _rank_world(state)
    out_dir = Path(out_dir)
    samples_dir = out_dir / SAMPLES_DIR
    items, conditions = make_plan(pipe, num_samples, seed, prompts)
    from argen import __version__

    settings = {"model": model_name, "model_fingerprint": model_fingerprint(pipe), "sampler": sampler,
                "sampler_options": options, "params": asdict(params), "seed": int(seed), "conditions": conditions,
                "num_samples": int(num_samples), "batch_size": int(batch_size), "argen_version": __version__}
    if num_tokens is not None:  # recorded only when set, so runs of full sequences resume as before
        settings["num_tokens"] = pipe.check_num_tokens(num_tokens)
    if pipe.tokenizer.decoding_settings:  # a flow decoder's steps and guidance: images depend on them
        settings["decoding"] = pipe.tokenizer.decoding_settings
    if pipe.decoder_dtype != "fp32":
        settings["decoder_dtype"] = pipe.decoder_dtype
    if sampler_obj.uses_draft and pipe.drafter is not None:  # its samples depend on the drafter too
        settings["drafter_fingerprint"] = model_fingerprint(pipe, [pipe.drafter])
    # The main process validates and records the settings; the others wait for it.
    error = None
    if rank == 0:
        try:
            claim_eval_dir(out_dir)
            if not (out_dir / RUN_FILE).is_file() and samples_dir.is_dir() and any(samples_dir.iterdir()):
                raise ArgenError(f"{samples_dir} holds images of no recorded run (no {RUN_FILE}); they are not "
                                 "counted as samples: use a new --out folder")
            samples_dir.mkdir(parents=True, exist_ok=True)
            _check_resume(out_dir / RUN_FILE, settings)
            atomic_write_text(out_dir / RUN_FILE, json.dumps(settings, indent=2) + "\n")
            atomic_write_text(out_dir / PLAN_FILE, "".join(json.dumps(asdict(it)) + "\n" for it in items))
        except (ArgenError, OSError) as exc:
            error = str(exc) if isinstance(exc, ArgenError) else f"cannot write to {out_dir}: {exc}"
    error = _broadcast_error(error, state)
    if error:
        raise ArgenError(error)

    # Block-cyclic split: block k = images [k*B, (k+1)*B) goes to process k % W. Every batch
    # is then the same block of images whatever W is, so even float round-off that depends on
    # the batch's contents cannot make image i differ between 1 and W processes.
    blocks = [items[lo:lo + batch_size] for lo in range(0, len(items), batch_size)]
    mine = [block for k, block in enumerate(blocks) if k % world == rank]
    owner = {it.index for block in mine for it in block}
    for tmp in samples_dir.glob(".*.png.*"):  # temporary files of a killed run (this process's images only)
        match = re.match(r"^\.(\d+)\.png\.", tmp.name)
        if match and int(match.group(1)) in owner:
            tmp.unlink(missing_ok=True)
    missing = {it.index for block in mine for it in block if not png_complete(sample_path(out_dir, it.index))}
    # A block with any image missing is sampled again whole (same batch as before), and only
    # its missing images are written: at most one block per process is re-sampled after a kill.
    todo = [block for block in mine if any(it.index in missing for it in block)]
    skipped = len(owner) - len(missing)
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    if log:
        log(f"{prefix}{len(missing)} image(s) to generate, {skipped} already present in {samples_dir}")
    from argen.progress import progress

    bar = progress(total=len(missing), desc=f"{prefix}sampling", unit="images", enabled=log is not None)
    start = time.perf_counter()
    nfe_total, sampled, done = 0.0, 0, 0
    for batch in todo:
        conds = plan_conditions(pipe, batch)
        seeds = [it.seed for it in batch]
        out = pipe.sample_tokens(conds, seeds, sampler_obj, params, batch_size=len(batch), num_tokens=num_tokens)
        nfe_total += float(out.nfe_per_sample.float().sum())
        sampled += len(batch)
        for j, it in enumerate(batch):
            if it.index not in missing:
                continue
            # one image per decode, so an image never depends on what shared its batch
            image = to_pil(pipe.tokens_to_images(out.tokens[j:j + 1], conds[j:j + 1], seeds[j:j + 1]))[0]
            save_png_atomic(image, sample_path(out_dir, it.index))
            done += 1
            bar.update(1)
            if on_saved is not None:
                on_saved(it.index)
    bar.close()
    if log and todo:
        log(f"{prefix}{done}/{len(missing)} images ({done / (time.perf_counter() - start):.2f} images/s)")
    return {"generated": done, "skipped": skipped, "sampled": sampled,
            "nfe_per_image": nfe_total / sampled if sampled else None,
            "seconds": time.perf_counter() - start, "rank": rank, "world_size": world}


def _broadcast_error(error: Optional[str], state) -> Optional[str]:
    """Share an error string from any process with all of them (so no process waits forever)."""
    if state is None or state.num_processes == 1:
        return error
    from ..distributed import gather_objects

    errors = [e for e in gather_objects(error, state.num_processes) if e]
    return errors[0] if errors else None
