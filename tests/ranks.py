"""Running a function on T ranks of one Gloo group: T spawned processes on this machine.

``on_ranks(fn, T, *args)`` returns each rank's result, rank by rank; a rank that raises fails
the caller with its traceback. ``fn`` must be importable (a module-level function).
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch.multiprocessing as mp

TIMEOUT_S = 300


def on_ranks(fn, size: int, *args) -> list:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    answers = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(fn, rank, size, address, args, answers)) for rank in range(size)]
    for proc in procs:
        proc.start()
    results: dict[int, object] = {}
    try:
        for _ in procs:
            rank, ok, value = answers.get(timeout=TIMEOUT_S)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    return [results[rank] for rank in range(size)]


def _run(fn, rank: int, size: int, address: str, args: tuple, answers) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        from workers.autotp import join

        join(address, rank, size, "cpu")
        # pickled here: a tensor put as it is would be shared memory that goes with this process
        answers.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        answers.put((rank, False, traceback.format_exc()))
