"""The published contract, fuzzed: schemathesis generates requests from the server's own /openapi.json (the plain
default model) and checks every response against it with all its checks: no 5xx, no undocumented status or content
type, bodies and server-sent events as documented, schema-valid requests accepted, invalid ones refused, and (with
--api-key) no route but /health served without the key. Bodies ask for at most 4 new tokens
(tests/schemathesis_hooks.py), and the served context is 1,024 tokens, so a body that escapes the hook still ends
within seconds. Schemathesis' coverage phase is left out: its boundary cases skip the hooks and would
generate up to the whole context on a CPU; the examples and fuzzing phases run."""
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from schemathesis_hooks import CONTEXT

from engine.config import EngineConfig
from server.background import BackgroundServer
from server.factory import create_app

TESTS = Path(__file__).resolve().parent
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def fuzz(url: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SCHEMATHESIS_HOOKS="schemathesis_hooks", PYTHONPATH=str(TESTS))
    return subprocess.run([str(SCHEMATHESIS), "run", f"{url}/openapi.json", "--checks", "all", "--phases",
                           "examples,fuzzing", "--max-examples", "30", "--seed", "0", "--request-timeout", "60",
                           "--max-response-time", "60", "--generation-database", "none",
                           "--no-color", *extra], cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)


def serve(**options) -> BackgroundServer:
    config = EngineConfig(spec_method="none", kv_cache_gb=0.2, max_num_seqs=8, max_model_len=CONTEXT)
    return BackgroundServer(create_app(config, **options))


def blocks_all_free(server: BackgroundServer, timeout: float = 10) -> bool:
    blocks = server.engine_loop.engine.block_manager
    deadline = time.monotonic() + timeout
    while blocks.num_free_blocks != blocks.num_blocks and time.monotonic() < deadline:
        time.sleep(0.1)
    return blocks.num_free_blocks == blocks.num_blocks


def test_the_document_holds_under_fuzzing_and_the_server_keeps_serving():
    with serve() as s:
        run = fuzz(s.url)
        assert run.returncode == 0, run.stdout[-6000:]
        assert "passed" in run.stdout and "failed" not in run.stdout.split("Test cases:")[-1]
        after = httpx.post(s.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3
        assert blocks_all_free(s), "a fuzzed request leaked KV blocks"


def test_with_an_api_key_nothing_but_health_is_served_without_it():
    with serve(api_key="fuzz-key") as s:
        run = fuzz(s.url, "--header", "Authorization: Bearer fuzz-key")
        assert run.returncode == 0, run.stdout[-6000:]
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                             ("POST", "/v1/chat/completions"), ("POST", "/admin/reload-calibration")):
            assert httpx.request(method, s.url + path, json={}).status_code == 401, path
        assert httpx.get(s.url + "/health").json() == {"status": "ok"}
