"""`make gpu-check`: the GPU path checked and measured in one run on a machine with an NVIDIA GPU and no internet,
needing only torch, triton, transformers and pytest besides this repository (run from its root).

1. The Triton kernel tests on CUDA against their torch twins, the engine's Triton path on CUDA against the torch
   path on CPU, and CUDA-graph replay against eager (greedy and seeded tokens identical).
2. A Qwen3-4B-shaped target with random bf16 weights and a DSpark-shaped draft (5 layers, gamma 7, Markov rank 256)
   through the engine's own model runner, eager and then with CUDA graphs: verify step time vs tokens and draft step
   time vs requests (the SPS(B) points the planner would use), and the issue's batch-1 ratios.
3. DeepSeek-V4-Flash's FP8 linears and MXFP4 MoE layer kept as stored: the stored-weight kernels against
   dequantizing (bench/stored_gemm.py); its CSA indexer's scores and exact top-k against the sort (bench/v4_indexer.py).
Writes report.json and report.md to --out."""
import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

KERNEL_TESTS = ["tests/test_triton_kv_budget.py", "tests/test_triton_attention.py",
                "tests/test_triton_sampling_kernels.py", "tests/test_triton_engine.py", "tests/test_cuda_graphs.py",
                "tests/test_flashinfer.py", "tests/test_triton_v4_attention.py", "tests/test_triton_sinkhorn.py",
                "tests/test_v4_cuda.py", "tests/test_v4_step_rows.py", "tests/test_triton_stored_moe.py"]
QWEN3_4B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2560,
            "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 40960,
            "vocab_size": 151936, "tie_word_embeddings": True, "attention_bias": False, "hidden_act": "silu",
            "torch_dtype": "bfloat16"}
DSPARK_4B = QWEN3_4B | {"architectures": ["Qwen3DSparkModel"], "num_target_layers": 36, "num_hidden_layers": 5,
                        "block_size": 7, "mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33],
                        "enable_confidence_head": True, "confidence_head_with_markov": True, "markov_rank": 256,
                        "markov_head_type": "vanilla", "tie_word_embeddings": False,
                        "layer_types": ["full_attention"] * 5, "num_anchors": 512}
VERIFY_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DRAFT_REQUESTS = (1, 2, 4, 8, 16, 32, 64)
DRAFT_VOCAB = 32768  # FR-Spec's draft vocabulary size for 128k-151k-token targets
V4_BENCHES = {  # report key -> (title, module with measure() and markdown())
    "stored_gemm": ("DeepSeek-V4-Flash's weights kept as stored (random bytes, bf16 activations)", "bench.stored_gemm"),
    "v4_indexer": ("DeepSeek-V4-Flash's CSA indexer in a fixed-shape step (random inputs)", "bench.v4_indexer")}
GOALS = {"draft_over_verify_b1": 0.15, "verify8_over_decode_b1": 1.15, "graphs_over_eager_b1": 1.3}


def run_kernel_tests(log_path: Path) -> dict:
    """The tests in a child pytest whose output goes to log_path as it runs (a hang still leaves its trace)."""
    start = time.perf_counter()
    per_test_limit = ["--timeout=240"] if importlib.util.find_spec("pytest_timeout") else []
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-rf", "-p", "no:cacheprovider",
                               *per_test_limit, *KERNEL_TESTS], stdout=log, stderr=subprocess.STDOUT, text=True)
    output = log_path.read_text()
    counts = [line for line in output.splitlines() if " passed" in line or " failed" in line or " error" in line]
    summary = (counts or output.strip().splitlines() or ["(no output)"])[-1].strip("= ")
    return {"passed": proc.returncode == 0, "summary": summary, "seconds": round(time.perf_counter() - start, 1),
            "output_tail": output[-4000:]}


def random_target(model_dir, dtype, device="cuda"):
    from engine.loader import read_config
    from engine.models.decoder import DecoderModel
    with torch.device(device):
        model = DecoderModel(read_config(model_dir)).to(dtype)
    model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def random_draft(draft_dir, target, dtype, method, vocab_size=0):  # loader.load_draft's signature; no vocab file
    from engine.drafts.dspark import DSparkDraft
    from engine.drafts.loader import read_draft_config
    with torch.device(target.embed_tokens.weight.device):
        draft = DSparkDraft(read_draft_config(Path(draft_dir), target.config)).to(dtype)
    draft.attach_target(target.embed_tokens, target.lm_head)
    return draft.eval().requires_grad_(False)


def build_engine(root: Path, kv_cache_gb: float, target=QWEN3_4B, draft=DSPARK_4B, device="cuda", kernels="triton",
                 dtype="bfloat16", max_num_seqs=64, attention="auto"):
    """The engine's model runner and block manager around random weights (no checkpoint to read)."""
    from engine import model_runner
    from engine.block_manager import BlockManager
    from engine.config import EngineConfig
    for name, cfg in (("target", target), ("draft", draft)):
        (root / name).mkdir(exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(cfg))
    config = EngineConfig(model=str(root / "target"), draft=str(root / "draft"), spec_method="dspark", dtype=dtype,
                          device=device, kernels=kernels, kv_cache_gb=kv_cache_gb,
                          max_num_seqs=max_num_seqs, attention=attention)
    from engine.drafts import loader
    loaders = model_runner.load_model, loader.load_draft
    model_runner.load_model = lambda model_dir, dtype: random_target(model_dir, dtype, device)
    loader.load_draft = random_draft
    try:
        runner = model_runner.ModelRunner(config)
    finally:
        model_runner.load_model, loader.load_draft = loaders
    return SimpleNamespace(model_runner=runner, block_manager=BlockManager(runner.num_blocks, config.kv_block_size))


def kernel_profile(engine, context_len: int, repeats: int = 3, rows: int = 15) -> str:
    """The GPU kernels of a batch-1 decode step and a batch-1 draft step (eager), by self device time."""
    from torch.profiler import ProfilerActivity, profile

    from engine.cost_model import fake_requests, time_draft, time_forward
    on_gpu = engine.model_runner.device.type == "cuda"
    seqs = fake_requests(engine.model_runner, engine.block_manager, 1, context_len)
    try:
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_gpu) as prof:
            time_forward(engine.model_runner, seqs, [1], repeats)
            time_draft(engine.model_runner, seqs, repeats)
    finally:
        engine.block_manager.free(seqs[0])
    return prof.key_averages().table(sort_by=f"self_{'device' if on_gpu else 'cpu'}_time_total", row_limit=rows)


def stage(name: str):
    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)


def measure(engine, context_len: int, repeats: int, tokens=VERIFY_TOKENS, requests=DRAFT_REQUESTS,
            draft_vocab: int = DRAFT_VOCAB) -> dict:
    """Step times eager, then with CUDA graphs captured (the serving path); the batch-1 ratios of the latter; then
    the draft step again (graphs) proposing among draft_vocab tokens only (python -m train draft-vocab)."""
    from engine.cost_model import ROWS_PER_REQUEST, measure_curve
    from engine.graphs import TOKEN_TIERS
    tokens = sorted(set(tokens) | {t for t in TOKEN_TIERS if t <= max(tokens)})  # the same grid for both
    runner, blocks = engine.model_runner, engine.block_manager
    stage("eager step times")
    eager = measure_curve(runner, blocks, tokens, requests, context_len, repeats)
    stage("kernel profile (eager, batch 1)")
    profile_table = kernel_profile(engine, context_len)
    stage("capturing CUDA graphs")
    runner.capture_graphs(context_len + 2 * ROWS_PER_REQUEST)
    stage("graph step times")
    graphs = measure_curve(runner, blocks, tokens, requests, context_len, repeats)
    draft = runner.drafter.draft
    draft.restrict_vocab(torch.arange(draft_vocab, device=draft.fc.weight.device))
    stage(f"draft graphs with a {draft_vocab}-token vocabulary")
    runner.drafter.capture_graphs(runner.config.max_num_seqs, context_len + 2 * ROWS_PER_REQUEST, runner.graphs.pool)
    subset = dict(zip(*measure_curve(runner, blocks, (1,), requests, context_len, repeats).draft_cost))
    stage("KV budget after a warm-up (start-up sizing; the graphs stay resident here)")
    try:  # last, and never at the cost of the numbers above
        kv_budget = f"{runner.free_gpu_kv_gb():.1f} GiB"
    except Exception as e:  # noqa: BLE001
        kv_budget = f"failed: {type(e).__name__}: {e}"
    stage("done")
    step, draft = dict(zip(*graphs.step_cost)), dict(zip(*graphs.draft_cost))
    eager_step, eager_draft = dict(zip(*eager.step_cost)), dict(zip(*eager.draft_cost))
    return {"context_len": context_len, "attention": runner.attention,
            "verify_ms": {b: {"eager": eager_step[b] * 1e3, "graphs": step[b] * 1e3} for b in step if b in eager_step},
            "draft_ms": {r: {"eager": eager_draft[r] * 1e3, "graphs": draft[r] * 1e3} for r in draft},
            "draft_over_verify_b1": draft[1] / step[8], "verify8_over_decode_b1": step[8] / step[1],
            "graphs_over_eager_b1": eager_step[1] / step[1], "draft_vocab": draft_vocab,
            "draft_vocab_ms": {r: subset[r] * 1e3 for r in subset},
            "draft_over_verify_b1_with_draft_vocab": subset[1] / step[8], "kernel_profile": profile_table,
            "kv_budget": kv_budget}


def markdown(report: dict) -> str:
    lines = [f"# gpu-check on {report['device']}", "",
             f"torch {report['torch']}, triton {report['triton']}; {report['seconds']} s in all", "",
             f"## Kernel and engine tests on CUDA: {'PASSED' if report['tests']['passed'] else 'FAILED'}", "",
             f"`{report['tests']['summary']}` ({report['tests']['seconds']} s)", ""]
    bench = report.get("bench")
    if bench:
        title = (f"## Qwen3-4B-shaped target + DSpark-shaped draft (random bf16 weights, context "
                 f"{bench['context_len']}, target attention: {bench.get('attention', 'triton')})")
        lines += [title, "", "| verify tokens B | eager ms | graphs ms |", "|---:|---:|---:|"]
        lines += [f"| {b} | {ms['eager']:.2f} | {ms['graphs']:.2f} |" for b, ms in bench["verify_ms"].items()]
        vocab_column = f"graphs, {bench['draft_vocab']}-token draft vocabulary"
        lines += ["", f"| requests R | draft eager ms | draft graphs ms | {vocab_column} |", "|---:|---:|---:|---:|"]
        lines += [f"| {r} | {ms['eager']:.2f} | {ms['graphs']:.2f} | {bench['draft_vocab_ms'][r]:.2f} |"
                  for r, ms in bench["draft_ms"].items()]
        lines += ["", "| batch-1 goal (with graphs) | measured | goal |", "|---|---:|---:|"]
        for name, goal in GOALS.items():
            lines.append(f"| {name} | {bench[name]:.2f} | {'>=' if name.startswith('graphs') else '<='} {goal} |")
        lines.append(f"| draft_over_verify_b1 with the draft vocabulary | "
                     f"{bench['draft_over_verify_b1_with_draft_vocab']:.2f} | <= {GOALS['draft_over_verify_b1']} |")
        lines += ["", f"KV cache the start-up sizing gives after a warm-up (graphs resident): {bench['kv_budget']}"]
        lines += ["", "Kernels of a batch-1 decode step and draft step (eager, torch.profiler):", "", "```",
                  bench["kernel_profile"], "```"]
    if report.get("bench_error"):
        lines += ["", f"Benchmark failed: `{report['bench_error']}`"]
    for key, (title, module) in V4_BENCHES.items():
        if report.get(key):
            lines += ["", f"## {title}", "", importlib.import_module(module).markdown(report[key])]
        if report.get(f"{key}_error"):
            lines += ["", f"{title}: failed, `{report[f'{key}_error']}`"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench_out/gpu_check"))
    parser.add_argument("--context-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--kv-cache-gb", type=float, default=16.0)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--attention", default="auto", help="the target's attention: auto | triton | flashinfer")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu-check needs an NVIDIA GPU that torch can see")
    import triton
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "tests": ({"passed": None, "summary": "skipped", "seconds": 0} if args.skip_tests
                        else run_kernel_tests(args.out / "tests.log"))}
    print(f"tests: {report['tests']['summary']} ({report['tests']['seconds']} s)", flush=True)
    try:
        with tempfile.TemporaryDirectory() as root:
            engine = build_engine(Path(root), args.kv_cache_gb, attention=args.attention)
            report["bench"] = measure(engine, args.context_len, args.repeats)
            del engine  # its KV cache and graphs: the V4 timings below need the memory
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - the report still says what passed before the benchmark broke
        report["bench_error"] = f"{type(e).__name__}: {e}"
        report["bench_traceback"] = traceback.format_exc()[-4000:]
        print(report["bench_traceback"], flush=True)
    for key, (title, module) in V4_BENCHES.items():
        stage(title)
        try:
            report[key] = importlib.import_module(module).measure()
        except Exception as e:  # noqa: BLE001
            report[f"{key}_error"] = f"{type(e).__name__}: {e}"
            print(traceback.format_exc()[-4000:], flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "report.md").write_text(markdown(report))
    print(markdown(report))
    failed = {"bench_error"} | {f"{key}_error" for key in V4_BENCHES}
    ok = report["tests"]["passed"] is not False and not failed & report.keys()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
