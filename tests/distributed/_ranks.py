"""Run a function on W gloo ranks over loopback, with a hard timeout: a test can never hang."""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, timeout: float, fn, queue) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout),
        )
        try:
            queue.put((rank, "ok", fn(rank, world)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world: int, timeout: float = 50.0) -> list:
    """fn(rank, world) on each rank (picklable, module-level); its return values by rank. Raises
    AssertionError with the child's traceback if any rank failed, or TimeoutError after ``timeout``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [ctx.Process(target=_child, args=(r, world, port, timeout, fn, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple] = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            results[rank] = (status, value)
    except Exception as e:  # queue.Empty
        raise TimeoutError(f"ranks {sorted(set(range(world)) - set(results))} gave no result in {timeout} s") from e
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = {r: v for r, (s, v) in results.items() if s == "error"}
    assert not errors, "\n".join(f"rank {r}:\n{v}" for r, v in sorted(errors.items()))
    return [results[r][1] for r in range(world)]
