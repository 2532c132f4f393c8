"""Our model, paged cache and scheduler against transformers' own implementation (fp32)."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.model_runner import ModelRunner

ATOL = 2e-4


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def reference_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def recording_llm(model_dir, **options) -> tuple[LLM, dict]:
    """An LLM whose sampler records the logits each request sampled from, by (request, position)."""
    llm = LLM(model=str(model_dir), dtype="float32", **options)
    return llm, record_sampled_logits(llm)


def record_sampled_logits(llm: LLM) -> dict:
    """From now on, the logits each request of llm samples from, by (request, position)."""
    recorded, sample = {}, llm.model_runner.sample

    def record(logits, seqs):
        for row, seq in zip(logits, seqs):
            recorded[(seq.request_id, len(seq) - 1)] = row.clone()
        return sample(logits, seqs)
    llm.model_runner.sample = record
    return recorded


def test_full_prefill_logits(tiny_model_dir, reference):
    llm = LLM(model=str(tiny_model_dir), dtype="float32", kv_cache_gb=0.01)
    prompt = list(range(3, 60))
    seq_id = llm.add_request(prompt, SamplingParams(max_tokens=1))
    [seq] = llm.scheduler.schedule()
    assert seq.request_id == seq_id and seq.num_scheduled_tokens == len(prompt)
    [ours], _ = llm.model_runner.forward([seq], [len(prompt)])
    torch.testing.assert_close(ours, reference_logits(reference, prompt), atol=ATOL, rtol=0)


def test_decode_through_paged_cache(tiny_model_dir, reference):
    llm, recorded = recording_llm(tiny_model_dir, kv_cache_gb=0.01, kv_block_size=4)
    [out] = llm.generate([[7, 8, 9, 10, 11]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                         use_tqdm=False)
    full = [7, 8, 9, 10, 11] + out.token_ids
    ref = reference_logits(reference, full)
    for pos in range(4, len(full) - 1):
        torch.testing.assert_close(recorded[(out.request_id, pos)], ref[pos], atol=ATOL, rtol=0)
    assert full[5:] == ref[4:-1].argmax(-1).tolist()


def test_batch_with_chunked_prefill_and_preemption(tiny_model_dir, reference):
    block_size = 4
    head_dim = 32 if "qwen3" in str(tiny_model_dir) else 16
    runner_bytes = 2 * 3 * 2 * head_dim * 4 * block_size  # K+V x 3 layers x 2 KV heads x head_dim x fp32
    llm, recorded = recording_llm(tiny_model_dir, kv_block_size=block_size, max_num_batched_tokens=24,
                                  kv_cache_gb=40 * runner_bytes / 2**30)
    assert llm.block_manager.num_blocks == 40
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 300) for _ in range(rng.randrange(3, 70))] for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0, "the KV budget should have forced preemption"
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    for prompt, out in zip(prompts, outs):
        full = prompt + out.token_ids
        ref = reference_logits(reference, full)
        assert out.token_ids == ref[len(prompt) - 1:-1].argmax(-1).tolist()
        for pos in range(len(prompt) - 1, len(full) - 1):
            torch.testing.assert_close(recorded[(out.request_id, pos)], ref[pos], atol=ATOL, rtol=0)


def test_mixed_rows_in_one_forward(tiny_model_dir, reference):
    """Decode rows, multi-token rows and a chunk continuing a prefill, together in one flat forward."""
    llm = LLM(model=str(tiny_model_dir), dtype="float32", kv_cache_gb=0.01, kv_block_size=4)
    runner: ModelRunner = llm.model_runner
    prompts = [list(range(5, 30)), list(range(40, 47)), list(range(60, 100)), [3, 4]]
    ids = [llm.add_request(p, SamplingParams(max_tokens=8)) for p in prompts]
    seqs = [llm.sequences[i] for i in ids]
    computed = [20, 3, 10, 0]   # already in the cache before the mixed step
    for seq, n in zip(seqs, computed):
        if n:
            llm.block_manager.allocate(seq, n)
            seq.num_scheduled_tokens = n
            runner.forward([seq], [0])
            seq.num_computed_tokens = n
    scheduled = [5, 4, 30, 2]   # a verify-like row, a short row, a long chunk, a fresh prefill
    for seq, n in zip(seqs, scheduled):
        llm.block_manager.allocate(seq, seq.num_computed_tokens + n)
        seq.num_scheduled_tokens = n
    logits, _ = runner.forward(seqs, scheduled)
    for prompt, seq, n, ours in zip(prompts, seqs, scheduled, logits):
        end = seq.num_computed_tokens + n
        torch.testing.assert_close(ours, reference_logits(reference, prompt)[end - n:end], atol=ATOL, rtol=0)


def test_capture_layers_equal_hf_hidden_states(tiny_model_dir, reference):
    llm = LLM(model=str(tiny_model_dir), dtype="float32", kv_cache_gb=0.01)
    prompt = list(range(10, 30))
    llm.add_request(prompt, SamplingParams(max_tokens=1))
    [seq] = llm.scheduler.schedule()
    runner = llm.model_runner
    input_ids, positions = runner.prepare([seq])
    with torch.no_grad():
        _, captured = runner.model(input_ids, positions, capture_layers=(0, 1))
        ref = reference(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(captured[0], ref[1][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(captured[1], ref[2][0], atol=ATOL, rtol=0)
