"""bench/gpu_check.py runs only on a GPU machine; its engine set-up, measurement and report are exercised here on
CPU with a tiny model of the same construction (random weights through the engine's own model runner)."""
import json

from bench import gpu_check

TINY_TARGET = gpu_check.QWEN3_4B | {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                    "vocab_size": 320}
TINY_DRAFT = gpu_check.DSPARK_4B | {k: TINY_TARGET[k] for k in ("hidden_size", "intermediate_size",
                                                               "num_attention_heads", "num_key_value_heads",
                                                               "head_dim", "vocab_size")}
TINY_DRAFT |= {"num_target_layers": 4, "num_hidden_layers": 1, "target_layer_ids": [1, 2], "mask_token_id": 5,
               "markov_rank": 8, "layer_types": ["full_attention"]}


def test_gpu_check_measures_and_reports_on_a_tiny_model(tmp_path, gpu_memory):
    engine = gpu_check.build_engine(tmp_path, 0.01, TINY_TARGET, TINY_DRAFT, device="cpu", kernels="triton",
                                    dtype="float32", max_num_seqs=2)
    bench = gpu_check.measure(engine, context_len=24, repeats=1, tokens=(1, 8, 16), requests=(1, 2), draft_vocab=100)
    assert engine.model_runner.graphs is not None and engine.model_runner.drafter.graphs is not None
    assert set(bench["verify_ms"]) == {1, 2, 4, 8, 16} and set(bench["draft_ms"]) == {1, 2}  # + the graph tiers
    times = [ms[k] for ms in [*bench["verify_ms"].values(), *bench["draft_ms"].values()] for k in ("eager", "graphs")]
    assert all(t > 0 for t in times)
    assert bench["verify8_over_decode_b1"] == bench["verify_ms"][8]["graphs"] / bench["verify_ms"][1]["graphs"]
    assert bench["graphs_over_eager_b1"] == bench["verify_ms"][1]["eager"] / bench["verify_ms"][1]["graphs"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # the profile freed its KV
    assert set(bench["draft_vocab_ms"]) == {1, 2} and all(t > 0 for t in bench["draft_vocab_ms"].values())
    assert engine.model_runner.drafter.draft.vocab_head.weight.shape[0] == 100
    assert bench["kv_budget"] == f"{0.9 * 10 - 2 * 1:.1f} GiB" and gpu_memory["calls"] == ["reset"]
    report = {"device": "cpu", "torch": "t", "triton": "t", "seconds": 1.0, "bench": bench,
              "tests": {"passed": True, "summary": "1 passed", "seconds": 1.0}}
    text = gpu_check.markdown(json.loads(json.dumps(report)))
    assert "aten::" in bench["kernel_profile"] and bench["kernel_profile"] in text
    assert "7.0 GiB" in text and "| 8 |" in text and "graphs_over_eager_b1" in text
    assert "PASSED" in text and "100-token" in text


def test_stored_gemm_bench_runs_and_reports_on_tiny_shapes():
    """bench/stored_gemm.py's smoke mode (CPU, Triton's interpreter): both ways timed at each size, in the report."""
    from bench import stored_gemm
    from kernels import triton_support
    try:
        result = stored_gemm.measure(smoke=True, repeats=1)
    finally:
        triton_support.select("torch")
    assert list(result["linear_ms"]) == ["w [96x256] rows 1", "w [96x256] rows 8", "g [2 x 128x256] rows 1",
                                         "g [2 x 128x256] rows 8"]
    assert list(result["moe_ms"]) == ["tokens 1", "tokens 8"]
    assert all(t > 0 for v in [*result["linear_ms"].values(), *result["moe_ms"].values()] for t in v.values())
    report = {"device": "cpu", "torch": "t", "triton": "t", "seconds": 1.0, "stored_gemm": result,
              "tests": {"passed": True, "summary": "1 passed", "seconds": 1.0}}
    assert "| tokens 8 |" in gpu_check.markdown(report) and "kept as stored" in gpu_check.markdown(report)


def test_v4_indexer_bench_runs_and_reports_on_cpu():
    from bench import v4_indexer
    result = v4_indexer.measure("cpu", sizes=((3, 600),), repeats=1)
    assert all(t > 0 for t in result["3 rows x 600 slots"].values())
    report = {"device": "cpu", "torch": "t", "triton": "t", "seconds": 1.0, "v4_indexer": result,
              "v4_indexer_error": "RuntimeError: x", "tests": {"passed": True, "summary": "1 passed", "seconds": 1.0}}
    text = gpu_check.markdown(report)
    assert "| 3 rows x 600 slots |" in text and "CSA indexer in a fixed-shape step (random inputs): failed" in text
