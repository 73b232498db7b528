"""The processes of a multi-process run (`accelerate launch`, torchrun): setting them up, and sharing Python
objects between them. Evaluation and training both go through here.

`process_state` / `make_accelerator`: accelerate's `PartialState` / `Accelerator`, asked for the CPU whenever the
run is on the CPU. accelerate picks its multi-process CPU backend (gloo) only when asked. Otherwise every process
of `accelerate launch --multi_gpu --num_processes N` on a CPU machine comes up as a single process of its own, and
each does all the work into the same output folder. A launch whose processes do not see each other is refused
in one line.

`gather_objects` is written here rather than taken from accelerate (`accelerate.utils.gather_object`, i.e.
`torch.distributed.all_gather_object`) for one reason, traced with gdb on a core dump of an aborted run:

    gloo runs each collective on a worker thread of its own, and that thread drops its reference to the
    collective's tensors a moment *after* the caller has been woken. `all_gather_object` makes its tensors
    inside the call, so when it returns, Python has let go of them and gloo's reference is the last one.
    Freeing a tensor that was ever seen from Python needs the GIL. When the worker gets there while the
    interpreter is shutting down (a process whose work is done exits at once), CPython 3.11 ends the
    thread with `pthread_exit` from inside a C++ destructor, and the process aborts: "terminate called
    without an active exception", exit code -6, after all its outputs were written (CPython gh-87135).

Here the caller keeps its tensors until gloo has let go of them (their C++ use count is back to one), so
the worker's release is a plain reference count and never needs the GIL.
"""

from __future__ import annotations

import os
import pickle
import time

from .errors import ArgenError


def runs_on_cpu(device=None) -> bool:
    """Whether accelerate should be asked for the CPU: ``device`` says so, there is no CUDA device, or the
    environment asks for it (ACCELERATE_USE_CPU)."""
    import torch

    return (str(device or "").startswith("cpu") or not torch.cuda.is_available()
            or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))


def process_state(device=None):
    """accelerate's `PartialState` for this process (one process when not launched with accelerate / torchrun)."""
    from accelerate import PartialState

    return _checked(PartialState(cpu=runs_on_cpu(device)))


def make_accelerator():
    """accelerate's `Accelerator` for a training run, on the CPU when the run is (see the module's docstring)."""
    from accelerate import Accelerator

    return _checked(Accelerator(cpu=runs_on_cpu()))


def _checked(state):
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and state.num_processes != world:
        raise ArgenError(f"launched as {world} processes but accelerate set up {state.num_processes}; "
                         "every process would do all the work")
    return state


def gather_objects(obj, num_processes: int) -> list:
    """``obj`` of every process, in rank order, on every process; ``[obj]`` for a single process.

    The objects travel pickled between the processes of one run, as in `all_gather_object`; nothing is
    read from a file or from outside the run.
    """
    if num_processes == 1:
        return [obj]
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = pickle.dumps(obj)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(num_processes)]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(num_processes)]
    dist.all_gather(parts, padded)
    _wait_until_released([size, padded, *sizes, *parts])
    return [pickle.loads(part[:int(n.item())].cpu().numpy().tobytes()) for part, n in zip(parts, sizes)]


def _wait_until_released(tensors: list, timeout: float = 10.0) -> None:
    """Return once no collective holds any of ``tensors`` (see the module's docstring), or after ``timeout``
    seconds. The sleep gives up the GIL, which is all the worker thread could be waiting for."""
    deadline = time.monotonic() + timeout
    while any(t._use_count() > 1 for t in tensors) and time.monotonic() < deadline:
        time.sleep(0.001)
