"""Server configurations beyond the default: API key, queue limit, a failing engine, speculative decoding, and the
`python -m server` process with a graceful SIGTERM."""
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import save_tiny_draft, save_tiny_model

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from server.background import BackgroundServer, free_port
from server.factory import create_app

LONG = {"prompt": "The quick brown fox", "max_tokens": 400, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("target"), "qwen3")


def serve(model_dir, **options) -> BackgroundServer:
    engine_options = {k: options.pop(k) for k in list(options) if k in EngineConfig.__dataclass_fields__}
    config = EngineConfig(model=str(model_dir), dtype="float32", kv_cache_gb=0.01, **engine_options)
    return BackgroundServer(create_app(config, "tiny", **options))


def samples(url: str, headers: dict | None = None) -> dict[tuple, float]:
    text = httpx.get(url + "/metrics", headers=headers).text
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_api_key_required_everywhere_but_health(target_dir):
    with serve(target_dir, api_key="sekret") as s:
        body = {"prompt": "hi", "max_tokens": 2}
        for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                             ("POST", "/v1/chat/completions")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                r = httpx.request(method, s.url + path, json=body, headers=headers)
                assert r.status_code == 401 and "API key" in r.json()["error"]["message"], (path, headers)
        good = {"Authorization": "Bearer sekret"}
        assert httpx.post(s.url + "/v1/completions", json=body, headers=good).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers=good).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200


def test_full_queue_gives_503_with_retry_after(target_dir):
    with serve(target_dir, max_num_seqs=1, max_waiting=1) as s, httpx.Client(base_url=s.url) as client:
        with client.stream("POST", "/v1/completions", json=LONG) as first, \
                client.stream("POST", "/v1/completions", json=LONG) as second:
            assert first.status_code == second.status_code == 200
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "capacity" in r.json()["error"]["message"]
        deadline = time.monotonic() + 10
        while s.engine_loop.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200


def test_engine_exception_fails_requests_with_500_not_the_process(target_dir):
    with serve(target_dir) as s:
        runner = s.engine_loop.engine.model_runner
        real_run = runner.run

        def fail_once(seqs):
            runner.run = real_run
            raise RuntimeError("injected kernel failure")
        runner.run = fail_once
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert r.status_code == 500 and "injected kernel failure" in r.json()["error"]["message"]
        blocks = s.engine_loop.engine.block_manager
        assert blocks.num_free_blocks == blocks.num_blocks
        runner.run = fail_once
        with httpx.stream("POST", s.url + "/v1/completions", json={**LONG, "max_tokens": 4}) as stream:
            events = [e for e in stream.read().decode().split("\n\n") if e]
        assert "injected kernel failure" in events[0] and events[-1] == "data: [DONE]"
        ok = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_speculative_decoding_is_greedy_exact_and_reports_spec_counters(target_dir, tmp_path):
    draft = save_tiny_draft(tmp_path / "draft", target_dir, block_size=4)
    prompts = ["The quick brown fox", "Paris is the capital", "def add(a, b):"]
    plain = LLM(model=str(target_dir), dtype="float32", kv_cache_gb=0.01)
    expected = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    with serve(target_dir, spec_method="dspark", draft=str(draft), verify_policy="fixed:3") as s:
        for prompt, want in zip(prompts, expected):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 20, "temperature": 0,
                                                            "ignore_eos": True})
            assert r.json()["choices"][0]["text"] == want.text
            assert r.json()["usage"]["completion_tokens"] == 20
        m = samples(s.url)
        stats = s.engine_loop.engine.spec_stats
    assert m[("vllm:spec_decode_num_drafts_total", ())] == stats.num_drafts > 0
    assert m[("vllm:spec_decode_num_draft_tokens_total", ())] == stats.num_draft_tokens
    assert m[("vllm:spec_decode_num_accepted_tokens_total", ())] == stats.num_accepted_tokens
    assert m[("dspark:spec_decode_num_verified_tokens_total", ())] == stats.num_verified_tokens
    per_pos = [m.get(("vllm:spec_decode_num_accepted_tokens_per_pos_total", (("position", str(i)),)), 0)
               for i in range(3)]
    assert per_pos == (stats.accepted_per_pos + [0, 0, 0])[:3]
    assert m[("dspark:request_verified_tokens_count", ())] == 3
    assert m[("dspark:request_verified_tokens_sum", ())] == stats.num_verified_tokens
    assert ("dspark:planner_step_budget", ()) in m and ("dspark:planner_expected_tokens_per_second", ()) in m
    k_steps = m[("dspark:planner_verify_length_count", ())]
    assert k_steps > 0 and 0 < m[("dspark:planner_verify_length_sum", ())] / k_steps <= 3


def test_per_request_draft_cap(target_dir, tmp_path):
    """max_verify_tokens in the body caps what the target verifies for that request (0: no speculation)."""
    draft = save_tiny_draft(tmp_path / "draft", target_dir, block_size=4)
    plain = LLM(model=str(target_dir), dtype="float32", kv_cache_gb=0.01)
    [want] = plain.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                            use_tqdm=False)
    with serve(target_dir, spec_method="dspark", draft=str(draft)) as s:
        stats = s.engine_loop.engine.spec_stats
        for cap in (0, 1):
            before = stats.num_verified_tokens
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "The quick brown fox", "max_tokens": 12,
                                                            "temperature": 0, "ignore_eos": True,
                                                            "max_verify_tokens": cap})
            assert r.json()["choices"][0]["text"] == want.text
            verified = stats.num_verified_tokens - before
            assert verified == 0 if cap == 0 else 0 < verified <= 11  # at most one draft per step
        bad = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_verify_tokens": -1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_verify_tokens"


def test_cli_process_finishes_in_flight_request_on_sigterm(target_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(target_dir), "--dtype", "float32",
                             "--kv-cache-gb", "0.01", "--port", str(port), "--served-model-name", "tiny"],
                            cwd=os.path.dirname(os.path.dirname(__file__)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        with httpx.stream("POST", url + "/v1/completions", json={**LONG, "max_tokens": 60}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]
        assert proc.wait(timeout=30) == -signal.SIGTERM  # uvicorn re-raises the signal once shut down
        assert b"engine loop stopped (0 unfinished requests aborted)" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become healthy")
