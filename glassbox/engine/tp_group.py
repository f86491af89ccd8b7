"""The process group of a tensor-parallel engine: rank 0 is the engine's own process (it schedules, samples
and talks to clients), ranks 1..N-1 are workers that run their shard of every forward pass.

Two ways to start one:
- `TensorParallelGroup.launch(N, device)`: rank 0 here, the N - 1 workers spawned on this host
  (`python -m glassbox.engine.tp_worker`), rendezvous over a TCPStore on a free loopback port;
- `TensorParallelGroup.from_environment()`: every rank started by `torchrun` (RANK, WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT in the environment), possibly over several hosts (`python -m glassbox.worker`).

Two process groups: the data group (gloo on the CPU, NCCL on CUDA) carries the layers' all-reduces and the
head's gather; a gloo control group carries rank 0's commands to the workers (`send` / `receive`, a
pickled object broadcast: tensors of a few KB a step; shared memory would not reach another host). The
control group's timeout is long, since workers wait on it while the server is idle; the data group's is
short, since within a step every rank reaches every collective within a layer's compute of the others.

A worker that dies closes its sockets: rank 0's collective then raises, and `raise_if_lost` turns that (or
a dead child process, checked between steps by `check_alive`) into `RankLostError`, which the engine treats
as fatal (health 503, every request answered) instead of waiting.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import weakref
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from glassbox.errors import RankLostError
from glassbox.layers.parallel import Communicator

logger = logging.getLogger(__name__)

DATA_TIMEOUT = timedelta(seconds=120)  # a collective inside a step; a rank that stalls longer is lost
CONTROL_TIMEOUT = timedelta(days=30)  # workers wait this long for rank 0's next command
STOP_WAIT_S = 10.0  # for a worker to exit after Stop, before it is killed
# Words of a collective's error when its peer went away (gloo, NCCL).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


class Stop:
    """Rank 0's last command: workers leave their loop and exit."""


class TensorParallelGroup:
    def __init__(
        self,
        rank: int,
        world_size: int,
        device: torch.device,
        control: dist.ProcessGroup,
        processes: list[subprocess.Popen] | None = None,
        owns_process_group: bool = True,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.backend = dist.get_backend()
        self.comm = Communicator(None, rank, world_size)  # the default (data) group
        self.control = control
        self.processes = processes or []  # the workers rank 0 spawned (none under torchrun)
        self.lost: str | None = None
        self.send_seconds = 0.0  # rank 0's time in `send` (pickling + broadcast), for the comm share of a step
        self._owns_process_group = owns_process_group
        # Workers are stopped when the engine is closed, or when the interpreter exits, whichever is first.
        self._finalizer = weakref.finalize(self, _kill_workers, self.processes)  # runs at exit too

    # ---- starting
    @classmethod
    def launch(cls, world_size: int, device: torch.device | str = "cpu") -> TensorParallelGroup:
        """Rank 0 in this process and ranks 1..N-1 as child processes on this host."""
        if dist.is_initialized():
            raise RuntimeError(
                "a torch.distributed process group already exists in this process: one tensor-parallel engine per "
                "process (close the other engine first)"
            )
        device = torch.device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A port free on IPv4 loopback, where the workers connect. With port 0 (the store's own pick) a worker
        # once failed to connect for 120 s under load; the store may listen on IPv6 first, so its pick need not
        # be free on IPv4 (not confirmed).
        store = dist.TCPStore("127.0.0.1", _free_port(), world_size, is_master=True, timeout=DATA_TIMEOUT, wait_for_workers=False)
        threads = _threads_per_rank(world_size)
        processes = [
            subprocess.Popen([
                sys.executable, "-m", "glassbox.engine.tp_worker", "--store", f"127.0.0.1:{store.port}",
                "--rank", str(rank), "--world-size", str(world_size), "--device", device.type, "--threads", str(threads),
            ])  # fmt: skip
            for rank in range(1, world_size)
        ]
        try:
            dist.init_process_group(backend, store=store, rank=0, world_size=world_size, timeout=DATA_TIMEOUT,
                                    device_id=_rank_device(device, 0) if device.type == "cuda" else None)  # fmt: skip
            control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        except Exception as error:
            codes = {rank: p.poll() for rank, p in enumerate(processes, start=1)}
            _kill_workers(processes)
            raise RuntimeError(f"the tensor-parallel workers did not join (exit codes by rank: {codes}): {error}") from error
        torch.set_num_threads(threads)
        return cls(0, world_size, _rank_device(device, 0), control, processes)

    @classmethod
    def launch_or_join(cls, world_size: int, device: torch.device | str = "cpu") -> TensorParallelGroup:
        """Rank 0 of torchrun's group when this process was started by torchrun with WORLD_SIZE=world_size,
        else `launch` the workers here."""
        if os.environ.get("WORLD_SIZE") == str(world_size) and os.environ.get("RANK") == "0":
            return cls.from_environment(device)
        return cls.launch(world_size, device)

    @classmethod
    def join(cls, store_address: str, rank: int, world_size: int, device: str) -> TensorParallelGroup:
        """A worker spawned by `launch`: join rank 0's store."""
        host, port = store_address.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), world_size, is_master=False, timeout=DATA_TIMEOUT)
        rank_device = _rank_device(torch.device(device), rank)
        backend = "nccl" if rank_device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=DATA_TIMEOUT,
                                device_id=rank_device if rank_device.type == "cuda" else None)  # fmt: skip
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        return cls(rank, world_size, rank_device, control)

    @classmethod
    def from_environment(cls, device: torch.device | str = "cpu") -> TensorParallelGroup:
        """Every rank started by torchrun (env:// rendezvous); on CUDA rank r uses GPU LOCAL_RANK."""
        device = torch.device(device)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        rank_device = torch.device("cuda", local_rank) if device.type == "cuda" else device
        backend = "nccl" if rank_device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method="env://", timeout=DATA_TIMEOUT,
                                    device_id=rank_device if rank_device.type == "cuda" else None)  # fmt: skip
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), rank_device, control)

    # ---- commands, rank 0 to the workers
    def send(self, command: Any) -> None:
        """Rank 0: hand `command` to every worker (they are waiting in `receive`)."""
        if self.lost is not None:
            raise RankLostError(self.lost)
        start = time.perf_counter()
        dist.broadcast_object_list([command], src=0, group=self.control)
        self.send_seconds += time.perf_counter() - start

    def receive(self) -> Any:
        """A worker: wait for rank 0's next command."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.control)

    def gather_objects(self, value: Any) -> list[Any] | None:
        """Every rank's `value` on rank 0, in rank order (None elsewhere): research results of a step."""
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(value, out, dst=0, group=self.control)
        return out

    # ---- health
    def check_alive(self) -> None:
        """Raise RankLostError if a spawned worker has exited (rank 0, between steps)."""
        if self.lost is None:
            for rank, process in enumerate(self.processes, start=1):
                code = process.poll()
                if code is not None:
                    self.lost = f"tensor-parallel rank {rank} exited with code {code}"
                    break
        if self.lost is not None:
            raise RankLostError(self.lost)

    def raise_if_lost(self, error: BaseException) -> None:
        """After a collective raised: RankLostError if a rank is gone (the error as the cause)."""
        try:
            self.check_alive()
        except RankLostError as lost:
            raise lost from error
        if any(words in str(error) for words in PEER_GONE):
            self.lost = f"a tensor-parallel rank cannot be reached: {error}"
            raise RankLostError(self.lost) from error

    def shutdown(self) -> None:
        """Rank 0: stop the workers (they exit) and leave the process group, so that another engine may form
        one in this process."""
        if self.rank == 0 and self.lost is None and dist.is_initialized():
            try:
                self.send(Stop())
                for process in self.processes:
                    process.wait(STOP_WAIT_S)
            except Exception:  # a worker is gone or stuck: the others are killed below
                logger.warning("not every tensor-parallel worker stopped when asked", exc_info=True)
        self._finalizer()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank % torch.cuda.device_count()) if device.type == "cuda" else device


def _threads_per_rank(world_size: int) -> int:
    """The CPU's cores shared between the ranks (OMP_NUM_THREADS, when set, bounds each rank)."""
    share = max(1, (os.cpu_count() or 1) // world_size)
    limit = os.environ.get("OMP_NUM_THREADS")
    return min(share, int(limit)) if limit and limit.isdigit() and int(limit) > 0 else share


def _kill_workers(processes: list[subprocess.Popen]) -> None:
    """Kill the workers still running and reap them all (never leaves an orphan or a zombie)."""
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()
