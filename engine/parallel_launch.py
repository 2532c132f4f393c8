"""Starting and stopping the ranks of one tensor-parallel engine. On one machine rank 0 (the process that builds the
engine) starts the others itself, one `python -m engine.parallel_worker` process each (not multiprocessing's spawn,
which runs the caller's main script again in the child: a script without an `if __name__ == "__main__"` guard would
start ranks recursively), which die with it (PR_SET_PDEATHSIG); across nodes
torchrun starts every process, and the ones whose RANK is not 0 turn into workers when they build the engine. A
collective that fails becomes a RankFailure naming the rank (after torchrun's and vLLM's multiproc executor's
practice of watching the workers it started)."""
import atexit
import base64
import ctypes
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from engine import distributed, parallel_step
from engine.config import EngineConfig
from engine.distributed import RankFailure

log = logging.getLogger("engine")
PR_SET_PDEATHSIG = 1
COLLECTIVE_ERRORS = ("gloo", "nccl", "timed out", "connection", "broken pipe")


class LocalRank:
    """A rank this process started: `python -m engine.parallel_worker` with the engine's config."""

    def __init__(self, rank: int, config: EngineConfig, init_method: str):
        payload = base64.b64encode(pickle.dumps(config)).decode()
        self.popen = subprocess.Popen([sys.executable, "-m", "engine.parallel_worker", str(rank), init_method,
                                       str(os.getpid()), payload])
        self.pid = self.popen.pid

    @property
    def exitcode(self) -> int | None:
        """None while it runs; minus the signal's number when a signal ended it."""
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout: float | None = None):
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self):
        self.popen.kill()


class Ranks:
    """The ranks of this engine as rank 0 sees them: the local processes it started (none under torchrun)."""

    def __init__(self, processes: list[LocalRank], timeout_s: float):
        self.processes, self.timeout_s, self.closed, self.failed = processes, timeout_s, False, False

    @contextmanager
    def watch(self):
        """A collective that fails inside becomes a RankFailure naming the rank."""
        try:
            yield
        except RankFailure:
            raise
        except RuntimeError as e:
            if not self.broken_ranks() and not any(word in str(e).lower() for word in COLLECTIVE_ERRORS):
                raise
            self.failed = True
            raise RankFailure(self.describe_failure(e)) from e

    def broken_ranks(self) -> list[str]:
        broken = []
        for rank, process in enumerate(self.processes, 1):
            process.join(timeout=0.2)  # reap one that is exiting right now
            if process.exitcode is not None:
                broken.append(f"rank {rank} (pid {process.pid}) exited with code {process.exitcode}")
            elif process_state(process.pid) in ("T", "t"):
                broken.append(f"rank {rank} (pid {process.pid}) is stopped")
        return broken

    def describe_failure(self, error: Exception) -> str:
        broken = self.broken_ranks()
        if broken:
            return "tensor parallelism failed: " + "; ".join(broken)
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return (f"tensor parallelism failed: a rank of 1..{distributed.world_size() - 1} did not answer within "
                f"{self.timeout_s:g} s or went away ({first})")

    def kill(self):
        """Stop every rank now, telling them nothing (a failed start: they may be anywhere in it)."""
        self.failed = True
        self.close()

    def close(self, timeout_s: float = 10.0):
        """Tell the workers to stop and wait for them; any still running then is killed. After a failure nothing is
        sent (a stopped rank would never read it: the send would block)."""
        if self.closed:
            return
        self.closed = True
        if not self.failed:
            sender = threading.Thread(target=self.send_stop, daemon=True)
            sender.start()
            sender.join(timeout_s)
            self.failed = sender.is_alive()
        for rank, process in enumerate(self.processes, 1):
            process.join(timeout=0 if self.failed else timeout_s)
            if process.is_alive():
                process.kill()  # SIGKILL: a stopped process never acts on SIGTERM
                process.join(timeout=timeout_s)
            elif process.exitcode and not self.failed:
                log.warning("tensor-parallel rank %d (pid %d) ended with code %d before it was told to stop", rank,
                            process.pid, process.exitcode)
        distributed.shutdown()

    @staticmethod
    def send_stop():
        try:
            parallel_step.stop_workers()
        except RuntimeError:
            pass  # a worker is gone already: the rest are killed by close()


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def start(config: EngineConfig) -> Ranks | None:
    """Join or start the process group of a tensor-parallel engine (None for one process). Under torchrun a
    process whose RANK is not 0 serves as a worker here and exits."""
    if config.tensor_parallel_size == 1:
        return None
    if distributed.is_parallel():
        raise ValueError("this process already belongs to a tensor-parallel engine: one engine per process")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return join_torchrun(config)
    port = free_port()
    processes = [LocalRank(rank, config, f"tcp://127.0.0.1:{port}") for rank in range(1, config.tensor_parallel_size)]
    distributed.init(0, config.tensor_parallel_size, config.device, config.tensor_parallel_timeout,
                     f"tcp://127.0.0.1:{port}", config.expert_parallel)
    ranks = Ranks(processes, config.tensor_parallel_timeout)
    atexit.register(ranks.close)
    return ranks


def join_torchrun(config: EngineConfig) -> Ranks:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != config.tensor_parallel_size:
        raise ValueError(f"torchrun started {world} processes but tensor_parallel_size is "
                         f"{config.tensor_parallel_size}: they must agree")
    distributed.init(rank, world, config.device, config.tensor_parallel_timeout, expert_parallel=config.expert_parallel)
    if rank != 0:
        sys.exit(run_worker(config))
    return Ranks([], config.tensor_parallel_timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_main(rank: int, config: EngineConfig, init_method: str, parent: int):
    """A local rank (engine/parallel_worker.py): dies with the process that started it, joins the group, serves."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # SIGKILL: stopped ranks too
    if os.getppid() != parent:
        sys.exit(1)  # the parent died before the line above took effect
    for sig in (signal.SIGINT, signal.SIGTERM):  # a terminal's Ctrl-C or a SIGTERM to the whole process group:
        signal.signal(sig, signal.SIG_IGN)      # rank 0 shuts down and stops this rank (or it dies with rank 0)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    distributed.init(rank, config.tensor_parallel_size, config.device, config.tensor_parallel_timeout, init_method,
                     config.expert_parallel)
    sys.exit(run_worker(config))


def run_worker(config: EngineConfig) -> int:
    """A worker rank: the same models and KV cache as rank 0's share, then the forwards rank 0 sends; 0 when told to
    stop; when rank 0 went away this process exits with code 1."""
    from engine.model_runner import ModelRunner
    try:
        parallel_step.serve(ModelRunner(config))
    except RuntimeError as e:
        print(f"tensor-parallel rank {distributed.rank()}: rank 0 went away ({str(e).splitlines()[0]})",
              file=sys.stderr, flush=True)
        os._exit(1)  # now, not through the broken process group's destructors (they can abort)
    distributed.shutdown()
    return 0
