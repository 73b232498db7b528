"""`argen.distributed.gather_objects`: objects of every process in rank order, and the wait that keeps gloo's
worker threads from freeing Python-owned tensors while the interpreter shuts down (see the module)."""

import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from argen.distributed import _wait_until_released, gather_objects


def test_one_process_gathers_its_own_object_without_a_process_group():
    payload = {"a": np.arange(3)}
    assert gather_objects(payload, 1) == [payload] and not dist.is_initialized()


def test_the_wait_returns_once_another_holder_lets_go():
    tensor = torch.zeros(4)
    holder = [tensor[:2]]  # a view holds the tensor, as a collective's work object does
    assert tensor._use_count() == 2

    def release():
        time.sleep(0.2)
        holder.clear()

    thread = threading.Thread(target=release)
    start = time.monotonic()
    thread.start()
    _wait_until_released([tensor])
    waited = time.monotonic() - start
    thread.join()
    assert tensor._use_count() == 1 and waited >= 0.2


def test_the_wait_gives_up_after_its_timeout():
    tensor = torch.zeros(4)
    view = tensor[:2]
    start = time.monotonic()
    _wait_until_released([tensor], timeout=0.1)
    assert 0.1 <= time.monotonic() - start < 5 and tensor._use_count() == 2
    del view


def _gather_in_rank(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # payloads of different lengths: the padding must not leak into what comes back
        mine = {"rank": rank, "text": "x" * (100 * rank + 1), "array": np.full(rank + 2, rank, dtype=np.float32),
                "none": None}
        results[rank] = gather_objects(mine, world)
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_in_rank_order(tmp_path):
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gather_in_rank, args=(world, str(tmp_path / "init"), results), nprocs=world, join=True)
        results = dict(results)
    for rank in range(world):
        got = results[rank]
        assert [g["rank"] for g in got] == [0, 1]
        assert [len(g["text"]) for g in got] == [1, 101]
        assert [g["array"].tolist() for g in got] == [[0.0, 0.0], [1.0, 1.0, 1.0]]
        assert all(g["none"] is None for g in got)
