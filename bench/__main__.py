"""python -m bench <command>: benchmarks of the engine (see docs/benchmarks.md)."""
import argparse
import importlib
from pathlib import Path

from bench import peers
from bench.serve import add_load_args, add_serve_args
from bench.serve_sweep import add_sweep_args
from engine.cli import add_engine_args
from engine.config import DEFAULT_DRAFT

WORKLOAD = {  # flags several benchmarks share, each with its own default
    "max_tokens": dict(type=int), "max_prompt_tokens": dict(type=int), "num_prompts": dict(type=int),
    "temperature": dict(type=float), "dataset": dict(), "concurrency": dict(type=int, nargs="+"),
    "repeats": dict(type=int),
}


def engine_flags(parser, *names: str, helps: dict[str, str] | None = None, **defaults):
    """The engine's own flags (engine/cli.py) named; benchmarks pin 2 threads and take the default draft unless they
    say otherwise."""
    defaults = {"num_threads": 2, "draft": str(DEFAULT_DRAFT)} | defaults
    add_engine_args(parser, names, helps, **{n: defaults[n] for n in names if n in defaults})


def workload_flags(parser, out: str, **defaults):
    """--out and the WORKLOAD flags named, with their defaults (a (default, help) pair for a flag with help)."""
    for name, value in defaults.items():
        default, help_text = value if isinstance(value, tuple) else (value, None)
        parser.add_argument("--" + name.replace("_", "-"), default=default, help=help_text, **WORKLOAD[name])
    parser.add_argument("--out", type=Path, default=Path(out))


def throughput(p):
    engine_flags(p, "model", "dtype", "num_threads", "seed")
    workload_flags(p, "bench_out", max_tokens=128, max_prompt_tokens=256, dataset="mtbench")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--hf-max-tokens", type=int, default=32, help="transformers is slow at batch 32: fewer steps")
    p.add_argument("--peers", default="hf,llama.cpp", help="comma list of hf, llama.cpp ('' for none)")
    p.add_argument("--gguf", default=str(peers.DEFAULT_PEERS_DIR / peers.DEFAULT_GGUF_NAME))


def spec(p):
    engine_flags(p, "model", "draft", "dtype", "num_threads", "seed", helps={"draft": "DSpark draft directory"})
    workload_flags(p, "bench_out", concurrency=[1, 8], max_tokens=48, max_prompt_tokens=256, temperature=1.0,
                   dataset="mtbench", repeats=(1, "runs per engine, taking turns; medians reported"))
    p.add_argument("--dflash-draft", default="", help="optionally also a DFlash draft")
    p.add_argument("--gamma", type=int, default=7)
    p.add_argument("--verify-policy", nargs="+", default=["full"], help="one drafter per policy, side by side")
    p.add_argument("--draft-vocab-sizes", type=int, nargs="+", default=[0],
                   help="one drafter per size, side by side: 0 = the draft's draft_vocab.json, -1 = every token")


def draft_vocab(p):
    engine_flags(p, "model", "draft", "verify_policy", "num_threads", "max_num_seqs", "seed", verify_policy="full",
                 max_num_seqs=24, helps={"draft": "a DSpark draft with a draft_vocab.json"})
    workload_flags(p, "bench_out/draft_vocab", num_prompts=(8, "per dataset"), max_tokens=64, max_prompt_tokens=256,
                   temperature=1.0)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--datasets", nargs="+", default=["humaneval", "mtbench", "math"])


def sweep(p):
    engine_flags(p, "model", "draft", "sps_profile", "kv_cache_gb", "dtype", "num_threads", "seed", kv_cache_gb=2.0,
                 helps={"sps_profile": "cost table from python -m profiler ('' = quick profile)",
                        "kv_cache_gb": "per engine (every policy's engine is loaded)"})
    workload_flags(p, "bench_out", concurrency=[1, 2, 4, 8, 16, 32, 64], max_tokens=64, max_prompt_tokens=256,
                   temperature=0.0, dataset="mtbench", num_prompts=128,
                   repeats=(1, "runs of each level per policy, the policies taking turns; points are median runs"))
    p.add_argument("--policies", nargs="+", default=["none", "fixed:1", "full", "threshold:0.5", "sps", "sps-lagged"])
    p.add_argument("--rounds", type=int, default=2, help="prompts per concurrency = rounds x concurrency")


def server_overhead(p):
    engine_flags(p, "num_threads", "seed")
    workload_flags(p, "bench_out", concurrency=[1, 32], max_tokens=64, dataset="mtbench")


def accept(p):
    engine_flags(p, "model", "dtype", "num_threads", "max_num_seqs", "kv_cache_gb", "seed", max_num_seqs=16,
                 kv_cache_gb=1.0)
    workload_flags(p, "bench_out/accept", num_prompts=(20, "per domain"), max_tokens=128, max_prompt_tokens=256)
    p.add_argument("--drafts", nargs="*", default=[], help="method:dir each (method dspark | dflash); default: "
                   "drafts/dspark-smollm2-135m and drafts/dflash-smollm2-135m where they exist")
    p.add_argument("--domains", nargs="+", default=["chat=mtbench", "code=humaneval", "math=math"],
                   help="name=prompt set each (mtbench, humaneval, math, sharegpt, jsonl:PATH)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--speed", action="store_true", help="also batch-1 greedy tokens/s, plain vs each draft")
    p.add_argument("--speed-prompts", type=int, default=4)


def prefix_cache(p):
    engine_flags(p, "model", "dtype", "num_threads", "seed")
    workload_flags(p, "bench_out/prefix_cache", num_prompts=8, max_tokens=64, dataset="sharegpt")


def calibration(p):
    workload_flags(p, "bench_out/calibration")
    p.add_argument("--from-rounds", nargs="+", required=True, metavar="PATH",
                   help="round logs a server wrote (--log-spec-rounds); each PATH after its rotated PATH.1")
    p.add_argument("--draft", default="", help="the DSpark draft that logged them: checks their block size; its "
                   "sts.json is the default --sts")
    p.add_argument("--sts", nargs="*", metavar="FILE", help="sts.json files to compare with the raw confidences "
                   "(default: the draft's own; --sts alone: raw only)")


def drift(p):
    engine_flags(p, "model", "draft", "verify_policy", "num_threads", "max_num_seqs", "seed", "calibration_window",
                 "log_spec_rounds", verify_policy="full", max_num_seqs=16, calibration_window=4000)
    workload_flags(p, "bench_out/drift", dataset="humaneval", num_prompts=64, max_tokens=128, max_prompt_tokens=256,
                   temperature=0.0)
    p.add_argument("--sample-every", type=int, default=250, help="rounds between samples of the monitor")


def linear(p):
    engine_flags(p, "model", "num_threads")
    workload_flags(p, "bench_out/linear", repeats=5)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--paths", nargs="*", default=[], help="only the paths whose names contain one of these")


COMMANDS = {  # name: (help, the function adding its flags); bench.<name with _> runs it
    "throughput": ("decode tokens/s: ours vs transformers vs llama.cpp", throughput),
    "spec": ("speculative decoding: tokens/s vs plain and the step cost split", spec),
    "draft-vocab": ("expected acceptance with the draft's top-K tokens vs every token", draft_vocab),
    "sweep": ("throughput vs per-user speed for each verify policy and concurrency", sweep),
    "server-overhead": ("HTTP streaming throughput and TTFT vs the offline engine", server_overhead),
    "accept": ("acceptance (tau, per-position) and confidence ECE per domain and temperature", accept),
    "calibration": ("reliability diagram of logged rounds' confidences, raw and under each sts.json", calibration),
    "drift": ("serve a prompt set logging rounds; the calibration monitor's ECE over time", drift),
    "prefix-cache": ("second-turn time to first token with and without prefix caching", prefix_cache),
    "linear": ("CPU linear paths (our kernels, torch bf16, oneDNN fp32) on the model's shapes", linear),
    "serve": ("load test of a running OpenAI-compatible server (vllm bench serve)", add_serve_args),
    "serve-sweep": ("start our server (and llama-server) per configuration, load it at each concurrency, plot the "
                    "Pareto picture", lambda p: add_load_args(add_sweep_args(p))),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_flags) in COMMANDS.items():
        add_flags(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    if args.command == "throughput":
        args.peers = args.peers.split(",")
    module = importlib.import_module(f"bench.{args.command.replace('-', '_')}")
    module.report(module.run(args), args.out)


if __name__ == "__main__":
    main()
