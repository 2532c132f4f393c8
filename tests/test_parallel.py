"""Tensor parallelism on CPU (gloo, 2 processes, one thread each): the engine spread over two ranks gives the tokens
of one process and of transformers' own model (fp32), plain and with a DSpark / DFlash draft, the same seeded samples
at T > 0; a rank that dies or stops is named in a RankFailure within the collective timeout, and no rank outlives
close()."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_engine_parity import record_sampled_logits
from tiny_models import save_tiny_draft, save_tiny_model, tiny_config, tiny_tokenizer
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.distributed import RankFailure, head_split, split
from engine.parallel import Shard
from server.background import free_port

ATOL = 2e-4
TIMEOUT_S = 5.0
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [10, 20, 30], list(range(40, 90))]


def local_ranks() -> list[int]:
    """This process's children that run a local rank (engine/parallel_worker.py) and are not yet reaped."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == os.getpid() and b"engine.parallel_worker" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_llm(model_dir, tp: int, **options) -> LLM:
    options = dict(dtype="float32", device="cpu", num_threads=1, kv_cache_gb=0.02, spec_method="none",
                   tensor_parallel_size=tp, tensor_parallel_timeout=TIMEOUT_S) | options
    return LLM(model=str(model_dir), **options)


def run(model_dir, tp: int, prompts, params, **options) -> tuple[list[list[int]], dict, LLM]:
    """Tokens per prompt and the logits rank 0 sampled from, by (prompt index, position); the engine closed."""
    llm = make_llm(model_dir, tp, **options)
    recorded = record_sampled_logits(llm)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.close()
    index = {out.request_id: i for i, out in enumerate(outs)}
    return [o.token_ids for o in outs], {(index[r], p): row for (r, p), row in recorded.items()}, llm


def transformers_greedy(model_dir, prompt: list[int], max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation and every position's logits from transformers' model (no cache: the whole sequence)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0]
            ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):], logits


def save_with_biases(path, family: str, vocab_size: int, **overrides):
    """A tiny model whose biases are random too (transformers initializes them to zero, where a bias added by every
    rank instead of one would go unnoticed)."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.15) if p.dim() > 1 else p.normal_(0, 0.1) if name.endswith("bias") else None
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("tp")
    qwen3 = save_tiny_model(base / "qwen3", "qwen3")
    draft = save_tiny_draft(base / "dspark", qwen3)
    (draft / "draft_vocab.json").write_text(json.dumps({"token_ids": list(range(2, 300, 3))}))
    # Llama: a tied head, biases on q/k/v and o (row-parallel: rank 0 adds it). Qwen2: q/k/v biases and every split
    # uneven over 2 ranks (3 K/V heads, 129 MLP columns, 321 tokens)
    llama = save_with_biases(base / "llama", "llama", 320, attention_bias=True)
    qwen2 = save_with_biases(base / "qwen2", "qwen2", 321, hidden_size=48, num_attention_heads=6,
                             num_key_value_heads=3, intermediate_size=129)
    return {"llama": llama, "qwen3": qwen3, "qwen2_uneven": qwen2, "dspark": draft,
            "dflash": save_tiny_draft(base / "dflash", qwen3, rank=0, confidence=False, seed=1)}


def heads(*args) -> tuple[int, int, int, int]:
    s = head_split(*args)
    return s.q_start, s.q_count, s.kv_start, s.kv_count


def test_split_shares_hand_computed():
    assert [split(10, 4, r) for r in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]
    assert [heads(6, 3, 2, r) for r in range(2)] == [(0, 4, 0, 2), (4, 2, 2, 1)]  # 3 K/V heads: 2 and 1
    assert [heads(8, 2, 4, r) for r in range(4)] == [(0, 2, 0, 1), (2, 2, 0, 1), (4, 2, 1, 1), (6, 2, 1, 1)]
    assert [heads(4, 1, 2, r) for r in range(2)] == [(0, 2, 0, 1), (2, 2, 0, 1)]  # one K/V head: replicated
    with pytest.raises(ValueError, match="multiple of the 2 K/V heads"):
        head_split(6, 2, 3, 0)


def test_shard_takes_ranges_and_pads():
    full = torch.arange(12.).view(6, 2)
    assert Shard(0, ((1, 2), (4, 1)), pad_to=4).take(full).tolist() == [[2, 3], [4, 5], [8, 9], [0, 0]]
    assert Shard(1, ((1, 1),)).take(full).tolist() == [[1], [3], [5], [7], [9], [11]]


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2_uneven"])
def test_greedy_matches_transformers(models, family):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    tokens, logits, _ = run(models[family], 2, PROMPTS, params, max_num_batched_tokens=32)  # chunked prefill
    for i, prompt in enumerate(PROMPTS):
        expected, ref = transformers_greedy(models[family], prompt, 10)
        assert tokens[i] == expected
        for pos in range(len(prompt) - 1, len(prompt) + 9):
            torch.testing.assert_close(logits[(i, pos)], ref[pos], atol=ATOL, rtol=0)


def test_step_longer_than_one_packet(models):
    """A prefill of 12 x 400 tokens: its message (4,800 token ids) outgrows one broadcast packet (4,096 words)."""
    prompts = [[(7 * i + 13 * j) % 300 + 2 for j in range(400)] for i in range(12)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    tp1, _, _ = run(models["qwen3"], 1, prompts, params, max_num_batched_tokens=8192, max_num_seqs=16)
    tp2, _, _ = run(models["qwen3"], 2, prompts, params, max_num_batched_tokens=8192, max_num_seqs=16)
    assert tp2 == tp1
    assert tp1[0] == transformers_greedy(models["qwen3"], prompts[0], 3)[0]


def test_seeded_samples_match_one_process(models):
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, max_tokens=16, ignore_eos=True, seed=s)
              for s in range(len(PROMPTS))]
    tp1, _, one = run(models["qwen3"], 1, PROMPTS, params)
    tp2, _, two = run(models["qwen3"], 2, PROMPTS, params)
    assert tp2 == tp1
    blocks = one.block_manager.num_blocks  # kv_cache_gb is per rank, and each rank holds one of the 2 K/V heads
    assert two.block_manager.num_blocks in (2 * blocks, 2 * blocks + 1)
    other_seeds = [SamplingParams(**{**p.__dict__, "seed": p.seed + 100}) for p in params]
    assert run(models["qwen3"], 1, PROMPTS, other_seeds)[0] != tp1  # negative control: the samples depend on seeds


@pytest.mark.parametrize("method", ["dspark", "dflash"])
def test_draft_matches_one_process(models, method):
    """Greedy and T = 0.9 with a draft: the same tokens, verify counts and (DSpark) confidences as one process;
    greedy is transformers' greedy. The DSpark draft proposes from an FR-Spec list (its LM head rows gathered)."""
    options = dict(spec_method=method, draft=str(models[method]), verify_policy="full")
    for temperature in (0.0, 0.9):
        params = [SamplingParams(temperature=temperature, max_tokens=12, ignore_eos=True, seed=s) for s in range(3)]
        results = {}
        for tp in (1, 2):
            llm = make_llm(models["qwen3"], tp, **options)
            records = llm.record_confidences() if method == "dspark" else []
            try:
                tokens = [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
            finally:
                llm.close()
            results[tp] = tokens, llm.spec_stats, records
        (tokens1, stats1, records1), (tokens2, stats2, records2) = results[1], results[2]
        assert tokens2 == tokens1 and stats2 == stats1 and stats1.num_verified_tokens > 0
        assert [(r.drafted, r.verified, r.accepted) for r in records2] == [(r.drafted, r.verified, r.accepted)
                                                                            for r in records1]
        for r1, r2 in zip(records1, records2):
            torch.testing.assert_close(torch.tensor(r2.logits), torch.tensor(r1.logits), atol=1e-4, rtol=0)
        if temperature == 0:
            assert tokens2[0] == transformers_greedy(models["qwen3"], PROMPTS[0], 12)[0]


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_failed_rank_is_named_within_the_timeout(models, fault):
    llm = make_llm(models["llama"], 2)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = llm.generate(PROMPTS[:1], params, use_tqdm=False)
    [worker] = llm.ranks.processes
    os.kill(worker.pid, fault)
    start = time.monotonic()
    with pytest.raises(RankFailure, match=rf"rank 1 \(pid {worker.pid}\) "
                                          rf"{'exited with code -9' if fault == signal.SIGKILL else 'is stopped'}"):
        llm.generate(PROMPTS[:1], params, use_tqdm=False)
    assert time.monotonic() - start < TIMEOUT_S + 3
    llm.close()
    assert not alive(worker.pid)
    again = make_llm(models["llama"], 2)  # the process can host a new engine
    try:
        assert again.generate(PROMPTS[:1], params, use_tqdm=False)[0].token_ids == first[0].token_ids
    finally:
        again.close()


def test_keep_alive_notices_a_stopped_rank(models):
    llm = make_llm(models["llama"], 2)
    llm.keep_alive()  # answered
    [worker] = llm.ranks.processes
    os.kill(worker.pid, signal.SIGSTOP)
    with pytest.raises(RankFailure, match="rank 1 .* is stopped"):
        llm.keep_alive()
    llm.close()
    assert not alive(worker.pid)


def test_close_stops_every_rank(models):
    llm = make_llm(models["llama"], 2)
    [worker] = llm.ranks.processes
    llm.close()
    assert worker.exitcode == 0  # told to stop, not killed


def test_a_failed_start_leaves_no_rank(models, tmp_path):
    """Weights that do not match the config fail every rank's load: the error reaches the caller, the other rank is
    gone and the process can start another engine."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in models["llama"].iterdir():
        (broken / f.name).symlink_to(f)
    config = json.loads((models["llama"] / "config.json").read_text()) | {"num_hidden_layers": 4}
    (broken / "config.json").unlink()
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match the LlamaForCausalLM config"):
        make_llm(broken, 2)
    assert local_ranks() == []
    make_llm(models["llama"], 2).close()


RANK_SCRIPT = """
import json, sys
from engine import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", device="cpu", spec_method="none", num_threads=1, kv_cache_gb=0.02,
          tensor_parallel_size=2, tensor_parallel_timeout=30)
print(json.dumps(llm.generate([[3, 1, 4, 1, 5]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                              use_tqdm=False)[0].token_ids), flush=True)
if sys.argv[2] == "die":
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
llm.close()
"""


def torchrun_ranks(model_dir, ending: str) -> list[tuple[int, str, str]]:
    """Two processes started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), rank 0 closing its
    engine at the end or being killed: each one's exit code, stdout and stderr."""
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(model_dir), ending], env=env | {"RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outputs = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    return [(rank.returncode, *out) for rank, out in zip(ranks, outputs)]


def test_ranks_from_a_torchrun_environment(models):
    """Rank 0 answers; rank 1 turns into a worker inside LLM() and exits 0 when rank 0 closes."""
    (code0, out0, _), (code1, out1, _) = torchrun_ranks(models["qwen3"], "close")
    assert (code0, code1) == (0, 0)
    assert json.loads(out0) == transformers_greedy(models["qwen3"], [3, 1, 4, 1, 5], 8)[0]
    assert out1 == ""


def test_a_torchrun_rank_exits_when_rank_0_dies(models):
    (code0, _, _), (code1, _, err1) = torchrun_ranks(models["qwen3"], "die")
    assert (code0, code1) == (-signal.SIGKILL, 1), err1[-3000:]
    assert "tensor-parallel rank 1: rank 0 went away" in err1
