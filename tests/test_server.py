"""The OpenAI-compatible server on a loopback port with a tiny model: the official SDK, streaming, exact usage,
parity with the offline engine, concurrency, disconnects, bad input and metrics."""
import asyncio
import json
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import save_tiny_model

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from server.background import BackgroundServer
from server.factory import create_app

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPTS = ["The quick brown fox", "Paris is the", "def add(a, b):", "héllo wörld 你好", "numbers 0123"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("chat-llama"), "llama")
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    app = create_app(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_gb=0.01), "tiny", max_waiting=64)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(model=str(model_dir), dtype="float32", kv_cache_gb=0.01)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def metrics(server) -> dict[tuple, float]:
    text = httpx.get(server.url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(server, name: str, **labels) -> float:
    return metrics(server).get((name, tuple(sorted({"model_name": "tiny", **labels}.items()))), 0.0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_sdk_completion_and_chat_with_exact_usage(client, offline, model_dir):
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=7, temperature=0, extra_body=NO_EOS)
    choice = out.choices[0]
    assert out.object == "text_completion" and choice.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(offline.tokenizer.encode(PROMPTS[0])), 7)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7

    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=5, temperature=0,
                                          extra_body=NO_EOS)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens == len(offline.chat_prompt(MESSAGES)) and chat.usage.completion_tokens == 5


def test_greedy_equals_offline_engine(client, offline):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = offline.generate(PROMPTS[:2] + [offline.chat_prompt(MESSAGES)], params, use_tqdm=False)
    for prompt, want in zip(PROMPTS[:2], expected):
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, extra_body=NO_EOS)
        assert got.choices[0].text == want.text
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                          extra_body=NO_EOS)
    assert chat.choices[0].message.content == expected[2].text


def test_finish_reason_stop_on_stop_string(client, offline):
    text = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                     extra_body=NO_EOS).choices[0].text
    stop = text[5:8]
    out = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=stop,
                                    extra_body=NO_EOS)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[:text.index(stop)]


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_streamed_equals_non_streamed_for_same_seed(client, route):
    args = {"model": "tiny", "max_tokens": 20, "temperature": 0.9, "top_p": 0.95, "seed": 1234, "extra_body": NO_EOS}
    if route == "completions":
        full = client.completions.create(prompt=PROMPTS[2], **args)
        chunks = list(client.completions.create(prompt=PROMPTS[2], stream=True,
                                                stream_options={"include_usage": True}, **args))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        full_text = full.choices[0].text
    else:
        full = client.chat.completions.create(messages=MESSAGES, **args)
        chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True,
                                                     stream_options={"include_usage": True}, **args))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        full_text = full.choices[0].message.content
    assert streamed == full_text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_format(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert sum(json.loads(e[6:])["choices"][0]["finish_reason"] is not None for e in events[:-1]) == 1


def test_64_concurrent_streaming_clients(server, offline):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(64)]
    expected = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                use_tqdm=False)
    before = metric(server, "vllm:generation_tokens_total")

    async def one(aclient, prompt):
        stream = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body=NO_EOS)
        chunks = [c async for c in stream]
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      http_client=openai.DefaultAsyncHttpxClient(
                                          limits=httpx.Limits(max_connections=64))) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))
    results = asyncio.run(run_all())
    assert [text for text, _ in results] == [e.text for e in expected]
    assert all(n == 12 for _, n in results)
    assert metric(server, "vllm:generation_tokens_total") - before == 64 * 12


def wait_idle(server, timeout: float = 10.0):
    engine = server.engine_loop.engine
    for _ in range(int(timeout / 0.05)):
        gauges = [metric(server, name) for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc")]
        if not engine.has_unfinished() and gauges == [0, 0]:
            return
        time.sleep(0.05)
    raise AssertionError("the engine did not go idle")


def test_disconnect_mid_stream_frees_kv_and_server_keeps_serving(server, client):
    aborts = metric(server, "vllm:request_success_total", finished_reason="abort")
    body = {"prompt": PROMPTS[3], "max_tokens": 400, "stream": True, "ignore_eos": True}

    async def leave_early(aclient):
        async with aclient.stream("POST", "/v1/completions", json=body) as r:
            lines = r.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass

    async def run_all():
        async with httpx.AsyncClient(base_url=server.url) as aclient:
            await asyncio.gather(*(leave_early(aclient) for _ in range(6)))
    asyncio.run(run_all())
    wait_idle(server)
    blocks = server.engine_loop.engine.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks
    assert metric(server, "vllm:kv_cache_usage_perc") == 0
    assert metric(server, "vllm:request_success_total", finished_reason="abort") - aborts == 6
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, extra_body=NO_EOS)
    assert out.usage.completion_tokens == 3


def test_non_streaming_disconnect_aborts(server):
    aborts = metric(server, "vllm:request_success_total", finished_reason="abort")
    body = {"prompt": PROMPTS[4], "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    wait_idle(server)
    blocks = server.engine_loop.engine.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks
    assert metric(server, "vllm:request_success_total", finished_reason="abort") - aborts == 1


def test_metrics_parse_and_counters_move(server, client, offline):
    before = metrics(server)
    client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, extra_body=NO_EOS)
    after = metrics(server)
    key = ("model_name", "tiny")

    def moved(name, **labels):
        k = (name, tuple(sorted({"model_name": "tiny", **labels}.items())))
        return after.get(k, 0) - before.get(k, 0)
    assert moved("vllm:generation_tokens_total") == 5
    assert moved("vllm:prompt_tokens_total") == len(offline.tokenizer.encode(PROMPTS[0]))
    assert moved("vllm:request_success_total", finished_reason="length") == 1
    assert moved("vllm:e2e_request_latency_seconds_count") == 1
    assert moved("vllm:time_to_first_token_seconds_count") == 1
    assert moved("vllm:inter_token_latency_seconds_count") >= 1
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert (gauge, (key,)) in after


def test_a_resent_conversation_is_served_from_the_prefix_cache(server, client):
    """The second turn of a chat resends the first: its prompt's full KV blocks come from the cache, and usage and
    /metrics say how many tokens that was."""
    messages = [{"role": "user", "content": "Tell me everything about the quick brown fox " * 4}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                           extra_body=NO_EOS)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    before = metric(server, "vllm:prefix_cache_hits_total"), metric(server, "vllm:prefix_cache_queries_total")
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            extra_body=NO_EOS)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens // 16 * 16 <= cached < second.usage.prompt_tokens and cached % 16 == 0
    assert metric(server, "vllm:prefix_cache_hits_total") - before[0] == cached
    assert metric(server, "vllm:prefix_cache_queries_total") - before[1] == second.usage.prompt_tokens - 1


BAD_INPUTS = [
    # (route, raw body or dict, status, param, words in the message)
    ("completions", b"{not json", 400, None, "not valid JSON"),
    ("completions", b"[1, 2]", 400, None, "object"),
    ("completions", {}, 400, None, "prompt"),
    ("completions", {"prompt": 5}, 400, "prompt", "Expected"),
    ("completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "int"),
    ("completions", {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens", "int"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", ">= 0"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "float"),
    ("completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "> 0.0"),
    ("completions", {"prompt": "hi", "top_k": -2}, 400, "top_k", ">= -1"),
    ("completions", {"prompt": "hi", "min_p": 1.5}, 400, "min_p", "<= 1.0"),
    ("completions", {"prompt": "hi", "seed": -1}, 400, "seed", ">= 0"),
    ("completions", {"prompt": "hi", "stop": [""]}, 400, "stop[0]", "length >= 1"),
    ("completions", {"prompt": "hi", "stop": 3}, 400, "stop", "Expected"),
    ("completions", {"prompt": "hi", "n": 2}, 400, "n", "<= 1"),
    ("completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", "bool"),
    ("completions", {"prompt": "hi", "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage",
     "bool"),
    ("completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("completions", {"prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens", "context length"),
    ("completions", {"prompt": "a " * 600, "max_tokens": 1}, 400, "max_tokens", "context length"),
    ("completions", {"prompt": [1, 2, 99999]}, 400, "prompt", "token ids"),
    ("completions", {"prompt": ""}, 400, "prompt", "length >= 1"),
    ("completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", "<= 20"),
    ("completions", {"prompt": "hi", "echo": True}, 400, "echo", "Invalid enum value"),
    ("chat", b"", 400, None, "body is empty"),
    ("chat", b"{not json", 400, None, "not valid JSON"),
    ("chat", b"[1, 2]", 400, None, "must be a JSON object"),
    ("chat", {"messages": []}, 400, "messages", "length >= 1"),
    ("chat", {"messages": "hello"}, 400, "messages", "array"),
    ("chat", {"messages": [{"content": "no role"}]}, 400, "messages[0]", "role"),
    ("chat", {"messages": MESSAGES, "max_completion_tokens": -3}, 400, "max_completion_tokens", ">= 1"),
]


@pytest.mark.parametrize("route,body,status,param,words", BAD_INPUTS)
def test_bad_input_gets_4xx_with_message(server, route, body, status, param, words):
    path = "/v1/completions" if route == "completions" else "/v1/chat/completions"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


def test_body_size_limit(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 600), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6), st.lists(st.integers(-2, 400), max_size=4),
                        st.dictionaries(st.sampled_from(["include_usage", "x"]), st.booleans(), max_size=2))
FIELDS = ["model", "prompt", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "stream",
          "stream_options", "ignore_eos", "stop_token_ids", "echo", "logprobs", "messages", "unknown_field"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6),
       max_tokens=st.sampled_from([0, 1, 3, -1, "3", 2.5, True, 2**70]),
       route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_bodies_never_500(server, body, max_tokens, route):
    r = httpx.post(server.url + route, json={**body, "max_tokens": max_tokens}, timeout=30)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["message"]


def test_engine_is_built_and_stepped_on_one_thread_not_the_main_one(model_dir, monkeypatch):
    """Every torch op of the server runs on the engine-loop thread: a second thread opening OpenMP regions made each
    decode step ~1.45x slower on 2 cores. A model that fails to load fails create_app with its own error."""
    import threading

    from engine.llm_engine import LLMEngine
    threads = {"init": set(), "step": set()}
    init, step = LLMEngine.__init__, LLMEngine.step
    monkeypatch.setattr(LLMEngine, "__init__", lambda self, *a, **k: threads["init"].add(threading.get_ident())
                        or init(self, *a, **k))
    monkeypatch.setattr(LLMEngine, "step", lambda self: threads["step"].add(threading.get_ident()) or step(self))
    app = create_app(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_gb=0.01), "tiny")
    with BackgroundServer(app) as running:
        body = {"model": "tiny", "prompt": "Paris is the", "max_tokens": 4, **NO_EOS}
        assert httpx.post(running.url + "/v1/completions", json=body).status_code == 200
    assert len(threads["init"]) == 1 and threads["init"] == threads["step"]
    assert threading.main_thread().ident not in threads["init"]
    missing = EngineConfig(model=str(model_dir / "missing"), dtype="float32")
    with pytest.raises(FileNotFoundError):
        create_app(missing, "tiny")


def test_requests_take_the_models_sampling_defaults_where_they_set_none():
    """Fields a request leaves out come from the model's generation_config (vLLM's behaviour); fields it sets win;
    without model defaults, OpenAI's (temperature 1.0)."""
    from types import SimpleNamespace

    from server.prompts import PromptBuilder
    from server.schemas import CompletionRequest
    engine = SimpleNamespace(max_model_len=64, kv_capacity_tokens=128, vocab_size=100,
                             sampling_defaults={"temperature": 0.2, "top_p": 0.9})
    prompts = PromptBuilder(engine, tokenizer=None, served_model_name="m")
    defaults = prompts.params(CompletionRequest(prompt=[1, 2]), [1, 2], None)
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.max_tokens) == (0.2, 0.9, -1, 62)
    chosen = prompts.params(CompletionRequest(prompt=[1, 2], temperature=0.0, top_k=3), [1, 2], 5)
    assert (chosen.temperature, chosen.top_p, chosen.top_k, chosen.max_tokens) == (0.0, 0.9, 3, 5)
    engine.sampling_defaults = {}
    openai_defaults = PromptBuilder(engine, None, "m").params(CompletionRequest(prompt=[1]), [1], 4)
    assert (openai_defaults.temperature, openai_defaults.top_p) == (1.0, 1.0)


def test_logprobs_over_http_match_the_engine_streamed_or_not(server, offline, client):
    """Chat (logprobs + top_logprobs) and completions (logprobs=k), streamed and not: each token's log-probability
    is the engine's and its alternatives are k (a piece that is part of a UTF-8 character reads U+FFFD, as in vLLM).
    """
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    expected = offline.generate([PROMPTS[1]], params, use_tqdm=False)[0]
    body = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    whole = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]
    assert whole["logprobs"]["token_logprobs"] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
    assert whole["text"] == expected.text and len(whole["logprobs"]["tokens"]) == 6
    assert whole["logprobs"]["text_offset"][0] == 0 and all(len(t) == 2 for t in whole["logprobs"]["top_logprobs"])
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=2,
                                         stream=True, extra_body=NO_EOS)
    lps = [lp for chunk in streamed for c in chunk.choices if c.logprobs for lp in c.logprobs.token_logprobs]
    assert lps == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3, extra_body=NO_EOS).choices[0]
    assert len(chat.logprobs.content) == 5 and all(len(e.top_logprobs) == 3 for e in chat.logprobs.content)
    assert all(e.logprob <= 0 and e.bytes == list(e.token.encode()) for e in chat.logprobs.content)
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0).choices[0]
    assert plain.logprobs is None
