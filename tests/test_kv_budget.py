"""The KV cache's size on a GPU (ModelRunner.free_gpu_kv_gb): measured after loading the models and a warm-up of the
largest step. The memory readings are faked here (tests/conftest.py: no GPU in CI); the warm-up itself runs on CPU,
on every attention path."""
import sys

import fake_flashinfer
import pytest

from engine.llm import LLM

GIB = 2**30


def runner_for(model_dir, **options):
    llm = LLM(model=str(model_dir), dtype="float32", spec_method="none", kv_cache_gb=0.01, max_num_batched_tokens=48,
              max_num_seqs=4, device="cpu", enforce_eager=True, **options)
    return llm.model_runner


@pytest.mark.parametrize("path", ["torch", "triton", "flashinfer"])
def test_warm_up_runs_the_largest_step_on_one_block(tiny_llama_dir, monkeypatch, path):
    if path == "flashinfer":
        monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    options = {"kernels": "torch"} if path == "torch" else {"kernels": "triton", "attention": path}
    runner = runner_for(tiny_llama_dir, **options)
    seen = {}
    forward, logits = runner.model.forward, runner.model.compute_logits
    monkeypatch.setattr(runner.model, "forward", lambda ids, *a: seen.update(tokens=len(ids)) or forward(ids, *a))
    monkeypatch.setattr(runner.model, "compute_logits", lambda h: seen.update(rows=len(h)) or logits(h))
    runner.warm_up()
    assert seen == {"tokens": 48, "rows": 4}  # a full prefill chunk; logits for max_num_seqs x 1 row (plain)
    assert runner.kv_cache.shape[3] == runner.block_size  # one block: the real cache is sized afterwards


def test_kv_budget_leaves_the_warm_up_peak_twice(tiny_llama_dir, gpu_memory, monkeypatch):
    runner = runner_for(tiny_llama_dir, kernels="torch")
    monkeypatch.setattr(runner, "warm_up", lambda: gpu_memory["calls"].append("warm-up"))
    assert runner.free_gpu_kv_gb() == pytest.approx(0.9 * 10 - 2 * 1)  # GiB, by hand
    assert gpu_memory["calls"] == ["reset", "warm-up"]  # the peak is measured across the warm-up
    gpu_memory["free"] = 2 * GIB  # 0.9 * 2 - 2 * 1 < 0: no room
    with pytest.raises(ValueError, match="no GPU memory left for a KV cache"):
        runner.free_gpu_kv_gb()
