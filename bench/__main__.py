"""python -m bench <command>: benchmarks of the engine (see docs/benchmarks.md)."""
import argparse
from pathlib import Path

from bench import peers


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
    sp.add_argument("--draft", required=True, help="DSpark draft directory (python -m train init-draft makes one)")
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
    sw.add_argument("--draft", required=True)
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
    args = parser.parse_args()
    if args.command == "throughput":
        from bench import throughput
        args.peers = args.peers.split(",")
        throughput.report(throughput.run(args), args.out)
    elif args.command == "server-overhead":
        from bench import server_overhead
        server_overhead.report(server_overhead.run(args), args.out)
    elif args.command == "sweep":
        from bench import sweep
        sweep.report(sweep.run(args), args.out)
    elif args.command == "spec":
        from bench import spec
        spec.report(spec.run(args), args.out)


if __name__ == "__main__":
    main()
