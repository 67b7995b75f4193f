"""Multi-process tests on the CPU (gloo): workers in spawned processes, on a free port chosen at run time, killed if
they outlive a time limit (a collective that never completes fails the test instead of blocking CI), their
tracebacks and native messages (gloo, an abort) reported by the test.

A worker is a module-level function (spawn pickles it by name) `worker(rank, world, port, out_dir, *args)` whose body
runs inside `with worker_process(rank, world, port, out_dir):`; run() starts `world` of them and waits.
"""

import datetime
import os
import socket
import time
import traceback
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def worker_process(rank: int, world: int, port: int, out_dir: str):
    """Around a worker's body: native messages to a file the test reports, one thread, the gloo process group;
    a traceback to rank<r>.err; at the end every rank meets, shuts down, and rank 0 (which hosts the store) leaves
    last, as a rank that leaves while another still talks to it can abort the other."""
    stderr = os.open(os.path.join(out_dir, f"rank{rank}.stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(stderr, 2)
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        yield
        dist.barrier()
        dist.destroy_process_group()
        open(os.path.join(out_dir, f"rank{rank}.done"), "w").close()
        if rank == 0:
            deadline = time.monotonic() + 30
            while not all(os.path.exists(os.path.join(out_dir, f"rank{r}.done")) for r in range(world)):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run(worker, args: tuple, world: int, out_dir: str, time_limit_s: float) -> None:
    """Runs worker(rank, world, port, out_dir, *args) on `world` spawned processes; fails the test with the first
    worker's traceback (or what a killed one printed) if any failed, or if they are not done in time."""
    context = mp.start_processes(
        worker, args=(world, _free_port(), out_dir, *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + time_limit_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the workers did not finish within {time_limit_s} s")
    except mp.ProcessRaisedException:
        pass  # the worker wrote its traceback; reported below
    except mp.ProcessExitedException as exited:  # killed by a signal: what it printed says why
        stderr = [
            open(os.path.join(out_dir, f)).read()[-3000:] for f in sorted(os.listdir(out_dir)) if f.endswith(".stderr")
        ]
        pytest.fail(f"{exited}\n" + "\n".join(stderr))
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
    assert not errors, errors[0]
