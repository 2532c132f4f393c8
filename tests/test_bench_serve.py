"""The load-test harness (bench serve): metrics by hand on recorded streams, a short run against our server on
loopback whose counts agree with its /metrics, and failures that are counted instead of crashing the run."""
import argparse
import io
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tiny_models import save_tiny_draft, save_tiny_model

from bench import serve
from bench.serve_client import LoadOptions, take_chunk
from bench.serve_metrics import RequestResult, parse_metrics, server_diff, summarize
from engine.config import EngineConfig
from server.background import BackgroundServer, free_port
from server.factory import create_app

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPTS = ["The quick brown fox", "Paris is the", "def add(a, b):", "héllo wörld 你好", "numbers 0123", "lazy dog"]


def content(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def replay(events: list[tuple[float, dict]], latency: float) -> RequestResult:
    """A request whose SSE data objects arrived at the given seconds after it was sent."""
    result, last = RequestResult(), 0.0
    for elapsed, chunk in events:
        last = take_chunk(result, chunk, elapsed, last)
    result.latency, result.ok = latency, True
    return result


def test_metrics_by_hand_on_recorded_streams():
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    usage = (lambda p, c: {"choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c}})
    a = replay([(0.05, role), (0.1, content("a")), (0.2, content("bc")), (0.3, content("d")), (0.5, content("e")),
                (0.5, usage(10, 5))], latency=0.5)
    b = replay([(0.2, content("x")), (0.5, content("yz")), (1.0, content("w")), (1.0, usage(20, 3))], latency=1.0)
    c = replay([(0.3, content("one")), (0.3, usage(30, 1))], latency=0.3)
    failed = RequestResult(error="boom")
    assert (a.ttft, a.itl, a.output_tokens, a.text) == (0.1, pytest.approx([0.1, 0.1, 0.2]), 5, "abcde")
    s = summarize([a, failed, b, c], duration=2.0, concurrency=2)
    assert (s["successful_requests"], s["failed_requests"], s["errors"]) == (3, 1, {"boom": 1})
    assert (s["total_input_tokens"], s["total_output_tokens"], s["usage_reported"]) == (60, 9, True)
    assert s["request_throughput"] == 1.5 and s["output_throughput"] == 4.5 and s["total_token_throughput"] == 34.5
    assert s["mean_concurrency"] == pytest.approx(0.9) and s["output_tok_s_per_concurrency"] == 2.25
    approx = (lambda d: pytest.approx(d, abs=1e-9))
    assert s["ttft_ms"] == approx({"mean": 200, "median": 200, "p90": 280, "p99": 298})
    # TPOT: a (0.5-0.1)/4 = 100 ms, b (1.0-0.2)/2 = 400 ms; c has one token and no TPOT
    assert s["tpot_ms"] == approx({"mean": 250, "median": 250, "p90": 370, "p99": 397})
    assert s["per_user_tok_s"] == approx({"mean": 6.25, "median": 6.25, "p90": 9.25, "p99": 9.925})
    # ITL: 100, 100, 200 (a) and 300, 500 (b)
    assert s["itl_ms"] == approx({"mean": 240, "median": 200, "p90": 420, "p99": 492})
    assert s["e2e_ms"] == approx({"mean": 600, "median": 500, "p90": 900, "p99": 990})


def test_chunk_count_stands_in_for_a_missing_usage_chunk_and_empty_run_is_all_none():
    r = replay([(0.1, content("a")), (0.2, content("b"))], latency=0.2)
    assert r.output_tokens == 0 and not r.usage_reported  # read_stream fills the chunk count in
    s = summarize([], duration=0.0)
    assert s["successful_requests"] == 0 and s["ttft_ms"]["p99"] is None and s["request_throughput"] == 0.0


SPEC = """# TYPE vllm:spec_decode_num_drafts counter
vllm:spec_decode_num_drafts_total{{model_name="m"}} {d}
# TYPE vllm:spec_decode_num_accepted_tokens counter
vllm:spec_decode_num_accepted_tokens_total{{model_name="m"}} {a}
# TYPE dspark:spec_decode_num_verified_tokens counter
dspark:spec_decode_num_verified_tokens_total{{model_name="m"}} {v}
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="0"}} {p0}
vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="1"}} {p1}
# TYPE vllm:request_success counter
vllm:request_success_total{{finished_reason="stop",model_name="m"}} {s}
vllm:request_success_total{{finished_reason="length",model_name="m"}} {n}
"""


def test_server_diff_spec_counters_and_absent_metrics():
    before = parse_metrics(SPEC.format(d=10, a=5, v=20, p0=4, p1=1, s=1, n=2))
    after = parse_metrics(SPEC.format(d=30, a=35, v=60, p0=19, p1=11, s=3, n=6))
    diff = server_diff(before, after)
    assert diff["requests"] == 6 and diff["num_drafts"] == 20 and diff["num_accepted_tokens"] == 30
    assert diff["acceptance_length"] == 2.5 and diff["mean_verify_budget"] == 2.0
    assert diff["per_position_acceptance"] == [0.75, 0.5]
    assert diff["generation_tokens"] is None and diff["per_position_verified"] is None  # not exported: absent
    peer = parse_metrics("# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total 7\n")
    assert set(server_diff(peer, peer).values()) == {None}
    assert server_diff(None, after) is None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("chat-llama"), "llama")
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def serve_args(tmp_path, url: str, **overrides) -> argparse.Namespace:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    argv = ["--url", url, "--dataset", f"jsonl:{prompts}", "--num-prompts", "6", "--concurrency", "2",
            "--max-tokens", "8", "--warmup", "1", "--out", str(tmp_path / "out"), "--no-progress"]
    args = serve.add_serve_args(argparse.ArgumentParser()).parse_args(argv)
    return argparse.Namespace(**vars(args) | overrides)


def test_short_run_agrees_with_server_metrics(model_dir, tmp_path, capsys):
    config = EngineConfig(model=str(model_dir), dtype="float32", kv_cache_gb=0.01, spec_method="none")
    with BackgroundServer(create_app(config, "tiny")) as s:
        result = serve.run(serve_args(tmp_path, s.url, ignore_eos=True))
        serve.report(result, tmp_path / "out")
    summary, server = result["summary"], result["server"]
    assert result["options"]["model"] == "tiny" and result["warmup_requests"] == 1 and result["warmup_failed"] == 0
    assert (summary["successful_requests"], summary["failed_requests"]) == (6, 0) and summary["usage_reported"]
    assert summary["total_output_tokens"] == 6 * 8 == server["generation_tokens"]  # warm-up left out of both
    assert server["requests"] == 6 and server["prompt_tokens"] == summary["total_input_tokens"] > 0
    assert server["num_drafts"] == 0 and server["acceptance_length"] is None
    assert all(r["ok"] and r["output_tokens"] == 8 and 0 < r["ttft"] <= r["latency"] for r in result["requests"])
    assert sum(len(r["itl"]) for r in result["requests"]) > 0
    assert summary["tpot_ms"]["mean"] > 0 and summary["output_throughput"] > 0
    saved = json.loads((tmp_path / "out" / "serve.json").read_text())
    assert saved["summary"]["successful_requests"] == 6
    assert "| output token throughput (tok/s) |" in capsys.readouterr().out


def test_spec_counters_through_metrics_diff(tmp_path):
    target = save_tiny_model(tmp_path / "target", "qwen3")
    (target / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    draft = save_tiny_draft(tmp_path / "draft", target, block_size=4)
    config = EngineConfig(model=str(target), dtype="float32", kv_cache_gb=0.01, spec_method="dspark",
                          draft=str(draft), verify_policy="fixed:3")
    with BackgroundServer(create_app(config, "tiny")) as s:
        result = serve.run(serve_args(tmp_path, s.url, warmup=0, ignore_eos=True))
        stats = s.engine_loop.engine.spec_stats
    server = result["server"]
    assert server["num_drafts"] == stats.num_drafts > 0
    assert server["acceptance_length"] == pytest.approx(1 + stats.num_accepted_tokens / stats.num_drafts)
    assert server["mean_verify_budget"] == pytest.approx(stats.num_verified_tokens / stats.num_drafts)
    assert 0 < server["mean_verify_budget"] <= 3
    per_pos = lambda counts: [n / stats.num_drafts for n in counts + [0] * 3][:3]
    assert server["per_position_acceptance"] == pytest.approx(per_pos(stats.accepted_per_pos))
    assert server["per_position_verified"] == pytest.approx(per_pos(stats.verified_per_pos))
    assert server["generation_tokens"] == 6 * 8 == result["summary"]["total_output_tokens"]


class Stub(BaseHTTPRequestHandler):
    """Misbehaves on /v1/chat/completions as the request's model says; everything else is 404."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_error(404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        getattr(self, body["model"].replace("-", "_"))()

    def http500(self):
        data = json.dumps({"error": {"message": "engine on fire", "code": 500}}).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def events(self, chunks: list[dict], done: bool, finish: bool = True):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")  # else the client may reuse the socket this handler then closes
        self.end_headers()
        for data in [f"data: {json.dumps(c)}\n\n" for c in chunks] + (["data: [DONE]\n\n"] if done else []):
            self.wfile.write(f"{len(data.encode()):x}\r\n{data}\r\n".encode())
            self.wfile.flush()
            time.sleep(0.01)
        if finish:
            self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def ok(self):
        self.events([content("Hi"), content(" there"), {"choices": [], "usage": {"prompt_tokens": 3,
                                                                                 "completion_tokens": 2}}], True)

    def cut(self):
        self.events([content("Hi"), content(" the")], done=False, finish=False)

    def no_done(self):
        self.events([content("Hi"), content(" the")], done=False)

    def error_event(self):
        self.events([content("Hi"), {"error": {"message": "KV cache gone", "code": 500}}], True)

    def stall(self):
        time.sleep(1.5)
        self.ok()


@pytest.fixture(scope="module")
def stub():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def run_stub(url: str, model: str, n: int = 3, timeout: float = 10.0) -> dict:
    opts = LoadOptions(model=model, max_tokens=4, concurrency=2, timeout=timeout)
    return serve.benchmark(url, ["hello"] * n, [], opts, progress=False)


@pytest.mark.parametrize("model, reason", [
    ("http500", "HTTP 500: engine on fire"), ("cut", "RemoteProtocolError"),
    ("no-done", "stream ended before [DONE]"), ("error-event", "error event: KV cache gone"),
    ("stall", "ReadTimeout")])
def test_failures_are_counted_with_their_reason(stub, model, reason):
    result = run_stub(stub, model, timeout=0.5 if model == "stall" else 10.0)
    summary = result["summary"]
    assert (summary["successful_requests"], summary["failed_requests"]) == (0, 3)
    [(error, count)] = summary["errors"].items()
    assert reason in error and count == 3
    assert result["server"] is None and summary["ttft_ms"]["mean"] is None  # no /metrics: absent, not an error
    assert any(reason in row[1] for row in serve.summary_rows(result))


def test_negative_control_same_stub_streams_fine(stub):
    summary = run_stub(stub, "ok")["summary"]
    assert (summary["successful_requests"], summary["failed_requests"], summary["errors"]) == (3, 0, {})
    assert summary["total_output_tokens"] == 6 and summary["itl_ms"]["mean"] > 0


def test_connection_refused_and_http_400_are_failures(model_dir, tmp_path):
    refused = serve.run(serve_args(tmp_path, f"http://127.0.0.1:{free_port()}"))
    assert refused["summary"]["failed_requests"] == 6 and refused["warmup_failed"] == 1
    assert list(refused["summary"]["errors"]) == ["ConnectError: All connection attempts failed"]
    config = EngineConfig(model=str(model_dir), dtype="float32", kv_cache_gb=0.01, spec_method="none")
    with BackgroundServer(create_app(config, "tiny")) as s:
        bad = serve.run(serve_args(tmp_path, s.url, temperature=-1.0))
        good = serve.run(serve_args(tmp_path, s.url))
    [error] = bad["summary"]["errors"]
    assert bad["summary"]["failed_requests"] == 6 and error.startswith("HTTP 400: ") and "temperature" in error
    assert bad["server"]["requests"] == 0 and bad["server"]["generation_tokens"] == 0
    assert good["summary"]["successful_requests"] == 6 and good["summary"]["errors"] == {}


def test_serve_sweep_starts_servers_skips_a_missing_peer_and_plots(tmp_path):
    from bench.serve import add_load_args
    from bench.serve_sweep import add_sweep_args, report, run
    target = save_tiny_model(tmp_path / "target", "qwen3")
    (target / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    draft = save_tiny_draft(tmp_path / "draft", target, block_size=4)
    argv = ["--configs", "fixed:2", "--concurrency", "1", "2", "--num-prompts-per-level", "2",
            "--llama-server", "--gguf", str(tmp_path / "missing.gguf"), "--model", str(target), "--draft", str(draft),
            "--dtype", "float32", "--num-threads", "1", "--server-args", "--kv-cache-gb 0.01", "--dataset", "math",
            "--max-tokens", "4", "--warmup", "1", "--out", str(tmp_path / "sweep"), "--no-progress"]
    args = add_load_args(add_sweep_args(argparse.ArgumentParser())).parse_args(argv)
    results = run(args)
    report(results, args.out)
    rows = {(r["config"], r["concurrency"]): r for r in results["rows"]}
    assert sorted(rows) == [("fixed:2", 1), ("fixed:2", 2)]
    assert all(r["summary"]["successful_requests"] == 2 == r["server"]["requests"] for r in rows.values())
    assert 0 < rows["fixed:2", 2]["server"]["mean_verify_budget"] <= 2
    reason = results["skipped"]["llama-server"]  # whichever is missing first: the binary (fresh clone) or the GGUF
    assert "missing.gguf" in reason or "llama-server not built" in reason, reason
    for name in ("serve_sweep.json", "serve_sweep.md", "serve_pareto.png", "serve_verify_budget.png"):
        assert (args.out / name).stat().st_size > 0
    assert "skipped llama-server" in (args.out / "serve_sweep.md").read_text()


def test_levels_resend_the_first_prompts_or_take_fresh_ones():
    from bench.serve import add_load_args
    from bench.serve_sweep import add_sweep_args, prompt_sets
    parser = add_load_args(add_sweep_args(argparse.ArgumentParser()))
    common = ["--concurrency", "1", "4", "--num-prompts-per-level", "2", "3"]
    prompts = [f"p{i}" for i in range(10)]
    assert prompt_sets(prompts, parser.parse_args(common)) == [[["p0", "p1"]], [["p0", "p1", "p2"]]]
    assert prompt_sets(prompts, parser.parse_args(common + ["--fresh-prompts"])) == [[["p0", "p1"]],
                                                                                   [["p2", "p3", "p4"]]]
    fresh_rounds = prompt_sets(prompts, parser.parse_args(common + ["--fresh-prompts", "--rounds", "2"]))
    assert fresh_rounds == [[["p0", "p1"], ["p2", "p3"]], [["p4", "p5", "p6"], ["p7", "p8", "p9"]]]


def test_rounds_take_turns_with_every_server_up_and_report_the_median_round(tmp_path):
    """--rounds 2: both servers are up for the whole sweep, each level runs once per round on each, in a rotated
    order, and the table shows the round with the median (here: lower) throughput."""
    from bench.serve import add_load_args
    from bench.serve_sweep import add_sweep_args, median_rounds, report, run
    target = save_tiny_model(tmp_path / "target", "qwen3")
    (target / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    draft = save_tiny_draft(tmp_path / "draft", target, block_size=4)
    argv = ["--configs", "none", "fixed:2", "--concurrency", "1", "--num-prompts-per-level", "2", "--rounds", "2",
            "--fresh-prompts", "--model", str(target), "--draft", str(draft), "--dtype", "float32", "--num-threads",
            "1", "--server-args", "--kv-cache-gb 0.01", "--dataset", "math", "--max-tokens", "4",
            "--out", str(tmp_path / "sweep"), "--no-progress"]
    args = add_load_args(add_sweep_args(argparse.ArgumentParser())).parse_args(argv)
    results = run(args)
    report(results, args.out)
    order = [(r["config"], r["round"]) for r in results["all_rounds"]]
    assert order == [("none", 0), ("fixed:2", 0), ("fixed:2", 1), ("none", 1)]
    assert all(r["summary"]["successful_requests"] == 2 for r in results["all_rounds"])
    assert all(r["server"]["requests"] == 2 for r in results["all_rounds"])  # /metrics agrees, round by round
    for log in ("none.log", "fixed_2.log"):  # each server started once and served both rounds
        assert (args.out / "logs" / log).read_text().count("Started server process") == 1
    for config in ("none", "fixed:2"):
        [shown] = [r for r in results["rows"] if r["config"] == config]
        rounds = [r["summary"]["output_throughput"] for r in results["all_rounds"] if r["config"] == config]
        assert shown["summary"]["output_throughput"] == min(rounds) and results["spread"][config][1] == rounds
    assert "Output tok/s of every round" in (args.out / "serve_sweep.md").read_text()
    rows = [{"config": "a", "concurrency": 1, "summary": {"output_throughput": x}} for x in (5.0, 9.0, 7.0)]
    assert median_rounds(rows)[0]["summary"]["output_throughput"] == 7.0


def test_serve_sweep_reports_a_server_that_cannot_start(tmp_path):
    from tqdm import tqdm

    from bench.serve import add_load_args
    from bench.serve_sweep import add_sweep_args, sweep_servers
    args = add_load_args(add_sweep_args(argparse.ArgumentParser())).parse_args(
        ["--concurrency", "1", "2", "--out", str(tmp_path), "--startup-timeout", "30"])
    crash = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    with tqdm(total=2, file=io.StringIO()) as bar:
        [row] = sweep_servers({"none": (crash, free_port())}, PROMPTS, [], args, bar)
        assert bar.n == 2
    assert row["config"] == "none" and "server exited with code 3: no model here" in row["error"]
