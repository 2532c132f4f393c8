"""`python -m server --tensor-parallel-size 2` as a user runs it (a subprocess, gloo on CPU): it streams what one
process answers; a worker that stops or dies makes requests answer 503 and the server exit with a message naming the
rank within the collective timeout; SIGTERM stops every rank; no process it started outlives it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tiny_models import save_tiny_model

from engine import LLM, SamplingParams
from server.background import free_port

TIMEOUT_S = 5.0
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
BODY = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("tp-chat"), "llama")
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


class Server:
    """The server in its own process; `started` collects every process it started (its descendants) as they run."""

    def __init__(self, model_dir: Path, log: Path):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "server", "--model", str(model_dir), "--port", str(self.port),
                   "--tensor-parallel-size", "2", "--tensor-parallel-timeout", str(TIMEOUT_S), "--device", "cpu",
                   "--dtype", "float32", "--spec-method", "none", "--num-threads", "1", "--kv-cache-gb", "0.02"]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                                        start_new_session=True)  # its own process group, as in a terminal
        self.started: set[int] = set()

    def wait_ready(self, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited early:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.started |= descendants(self.process.pid)
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError("the server did not become ready")

    def worker_pid(self) -> int:
        """The rank-1 process: the server's child that runs engine/parallel_worker.py."""
        workers = [pid for pid in descendants(self.process.pid) if b"engine.parallel_worker" in cmdline(pid)]
        assert len(workers) == 1, f"expected one local rank, found {workers}"
        return workers[0]

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()

    def left_behind(self) -> list[int]:
        deadline = time.monotonic() + 5  # a killed child may take a moment to be reaped
        while (alive := [pid for pid in self.started if running(pid)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        return alive


def children_of() -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            table.setdefault(ppid, []).append(int(entry.name))
    return table


def descendants(pid: int) -> set[int]:
    table, found, todo = children_of(), set(), [pid]
    while todo:
        for child in table.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def server(model_dir, tmp_path):
    running_server = Server(model_dir, tmp_path / "server.log")
    yield running_server.wait_ready()
    if running_server.process.poll() is None:
        running_server.process.kill()
        running_server.process.wait()
    for pid in running_server.started:  # a failed test leaves nothing behind either
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def streamed_text(url: str) -> str:
    text, done = "", False
    with httpx.stream("POST", url + "/v1/chat/completions", json=BODY | {"stream": True}, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    assert done
    return text


@pytest.mark.parametrize("to_group", [False, True], ids=["to-server", "to-process-group"])
def test_streams_what_one_process_answers_and_sigterm_stops_every_rank(server, model_dir, to_group):
    """SIGTERM to the server, or to its whole process group (systemd's default; a terminal's Ctrl-C reaches the group
    the same way): a graceful shutdown that stops the worker, not a worker dying first."""
    offline = LLM(model=str(model_dir), dtype="float32", device="cpu", spec_method="none", kv_cache_gb=0.02)
    [expected] = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert expected.text and streamed_text(server.url) == expected.text
    worker = server.worker_pid()
    if to_group:
        os.killpg(server.process.pid, signal.SIGTERM)
    else:
        server.process.send_signal(signal.SIGTERM)
    assert server.wait_exit(30) == -signal.SIGTERM  # uvicorn shuts down, then re-raises the signal it caught
    log = server.log.read_text()
    assert "engine loop stopped" in log and "Finished server process" in log
    assert "failed" not in log and "before it was told to stop" not in log
    assert worker in server.started and server.left_behind() == []


def test_stopped_worker_gives_503_and_the_server_exits_naming_it(server):
    worker = server.worker_pid()
    os.kill(worker, signal.SIGSTOP)
    start = time.monotonic()
    response = httpx.post(server.url + "/v1/chat/completions", json=BODY, timeout=60)
    assert response.status_code == 503
    assert f"rank 1 (pid {worker}) is stopped" in response.json()["error"]["message"]
    assert time.monotonic() - start < TIMEOUT_S + 5
    try:
        assert httpx.post(server.url + "/v1/chat/completions", json=BODY, timeout=10).status_code == 503
    except httpx.TransportError:
        pass  # or the server has closed its socket already
    assert server.wait_exit(30) == 1
    assert f"dspark-serve: tensor parallelism failed: rank 1 (pid {worker}) is stopped" in server.log.read_text()
    assert server.left_behind() == []


def test_killed_worker_makes_the_idle_server_exit_naming_it(server):
    worker = server.worker_pid()
    os.kill(worker, signal.SIGKILL)
    start = time.monotonic()
    assert server.wait_exit(TIMEOUT_S + 20) == 1
    assert time.monotonic() - start < TIMEOUT_S + 10
    assert f"rank 1 (pid {worker}) exited with code -9" in server.log.read_text()
    assert server.left_behind() == []
