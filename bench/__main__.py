"""python -m bench <command>: benchmarks of the engine (see docs/benchmarks.md)."""
import argparse
import importlib
from pathlib import Path

from bench import peers
from bench.serve import add_load_args, add_serve_args
from bench.serve_sweep import add_sweep_args
from engine.config import DEFAULT_DRAFT


def main():
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tp = sub.add_parser("throughput", help="decode tokens/s: ours vs transformers vs llama.cpp")
    tp.add_argument("--model", default="")
    tp.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    tp.add_argument("--threads", type=int, default=2)
    tp.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    tp.add_argument("--max-tokens", type=int, default=128)
    tp.add_argument("--hf-max-tokens", type=int, default=32, help="transformers is slow at batch 32: fewer steps")
    tp.add_argument("--max-prompt-tokens", type=int, default=256)
    tp.add_argument("--dataset", default="mtbench")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--peers", default="hf,llama.cpp", help="comma list of hf, llama.cpp ('' for none)")
    tp.add_argument("--gguf", default=str(peers.DEFAULT_PEERS_DIR / peers.DEFAULT_GGUF_NAME))
    tp.add_argument("--out", type=Path, default=Path("bench_out"))
    sp = sub.add_parser("spec", help="speculative decoding: tokens/s vs plain and the step cost split")
    sp.add_argument("--model", default="")
    sp.add_argument("--draft", default=str(DEFAULT_DRAFT), help="DSpark draft directory")
    sp.add_argument("--dflash-draft", default="", help="optionally also a DFlash draft")
    sp.add_argument("--gamma", type=int, default=7)
    sp.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    sp.add_argument("--max-tokens", type=int, default=48)
    sp.add_argument("--max-prompt-tokens", type=int, default=256)
    sp.add_argument("--temperature", type=float, default=1.0)
    sp.add_argument("--dataset", default="mtbench")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", type=Path, default=Path("bench_out"))
    sw = sub.add_parser("sweep", help="throughput vs per-user speed for each verify policy and concurrency")
    sw.add_argument("--model", default="")
    sw.add_argument("--draft", default=str(DEFAULT_DRAFT))
    sw.add_argument("--sps-profile", default="", help="cost table from python -m profiler ('' = quick profile)")
    sw.add_argument("--policies", nargs="+", default=["none", "fixed:1", "full", "threshold:0.5", "sps", "sps-lagged"])
    sw.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    sw.add_argument("--rounds", type=int, default=2, help="prompts per concurrency = rounds x concurrency")
    sw.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    sw.add_argument("--threads", type=int, default=2)
    sw.add_argument("--max-tokens", type=int, default=64)
    sw.add_argument("--max-prompt-tokens", type=int, default=256)
    sw.add_argument("--temperature", type=float, default=0.0)
    sw.add_argument("--dataset", default="mtbench")
    sw.add_argument("--num-prompts", type=int, default=128)
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--out", type=Path, default=Path("bench_out"))
    so = sub.add_parser("server-overhead", help="HTTP streaming throughput and TTFT vs the offline engine")
    so.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    so.add_argument("--max-tokens", type=int, default=64)
    so.add_argument("--threads", type=int, default=2)
    so.add_argument("--dataset", default="mtbench")
    so.add_argument("--seed", type=int, default=0)
    so.add_argument("--out", type=Path, default=Path("bench_out"))
    ac = sub.add_parser("accept", help="acceptance (tau, per-position) and confidence ECE per domain and temperature")
    ac.add_argument("--model", default="")
    ac.add_argument("--drafts", nargs="*", default=[], help="method:dir each (method dspark | dflash); default: "
                    "drafts/dspark-smollm2-135m and drafts/dflash-smollm2-135m where they exist")
    ac.add_argument("--domains", nargs="+", default=["chat=mtbench", "code=humaneval", "math=math"],
                    help="name=prompt set each (mtbench, humaneval, math, sharegpt, jsonl:PATH)")
    ac.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ac.add_argument("--num-prompts", type=int, default=20, help="per domain")
    ac.add_argument("--max-tokens", type=int, default=128)
    ac.add_argument("--max-prompt-tokens", type=int, default=256)
    ac.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ac.add_argument("--num-threads", type=int, default=2)
    ac.add_argument("--max-num-seqs", type=int, default=16)
    ac.add_argument("--kv-cache-gb", type=float, default=1.0)
    ac.add_argument("--speed", action="store_true", help="also batch-1 greedy tokens/s, plain vs each draft")
    ac.add_argument("--speed-prompts", type=int, default=4)
    ac.add_argument("--seed", type=int, default=0)
    ac.add_argument("--out", type=Path, default=Path("bench_out/accept"))
    add_serve_args(sub.add_parser("serve", help="load test of a running OpenAI-compatible server (vllm bench serve)"))
    add_load_args(add_sweep_args(sub.add_parser("serve-sweep", help="start our server (and llama-server) per "
                                                "configuration, load it at each concurrency, plot the Pareto picture")))
    args = parser.parse_args()
    if args.command == "throughput":
        args.peers = args.peers.split(",")
    module = importlib.import_module(f"bench.{args.command.replace('-', '_')}")
    module.report(module.run(args), args.out)


if __name__ == "__main__":
    main()
