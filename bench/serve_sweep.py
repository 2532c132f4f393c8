"""`python -m bench serve-sweep`: the serving picture over HTTP (the DSpark paper's Figures 7-8). For each configuration
our server is started as a subprocess (`python -m server`), the load test of bench/serve.py runs at each concurrency
(closed loop: the concurrency cap, every request sent at once), and the server is stopped. Optionally llama.cpp's
llama-server on the bf16 GGUF of the same model is measured the same way (same threads, as many slots as our
max_num_seqs, continuous batching). Writes serve_sweep.json, serve_sweep.md and two PNGs (serve_plot.py).

With --rounds R > 1 every server stays up for the whole sweep and each level runs R times, the configurations taking
turns (in a rotated order each round), so the runs compared at a level sit side by side in time: one server after
another, a 2-core machine drifts by +-10% over a sweep, more than the differences speculation makes under load. Each
reported point is the round with the median aggregate throughput; every round is kept in the JSON.

    python -m bench serve-sweep --configs none full fixed:1 sps sps-lagged --concurrency 1 4 16 --llama-server
"""
import shlex
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from itertools import accumulate, repeat
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from bench import peers
from bench.report import markdown_table, save_and_print
from bench.serve import benchmark, fmt, load_options
from engine.cli import add_engine_args
from engine.config import DEFAULT_DRAFT
from engine.prompt_sets import load_prompts

CONFIGS = ("none", "full", "fixed:1", "sps", "sps-lagged")
LLAMA = "llama-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_sweep_args(parser):
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS),
                        help="'none' (plain decoding) or a verify policy: full, fixed:k, threshold:c, sps, sps-lagged")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--num-prompts-per-level", type=int, nargs="+", default=None,
                        help="one count for every level or one per level (default: max(8, 4 x concurrency))")
    parser.add_argument("--fresh-prompts", action="store_true",
                        help="every level sends prompts no earlier level sent, so prompt caches start cold (default: "
                        "each level resends the first N prompts, which servers that cache prompts serve from cache)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run each level this many times, the configurations taking turns with every server up "
                        "at once (give --server-args '--kv-cache-gb 1' to fit them); points are median rounds")
    parser.add_argument("--llama-server", action="store_true", help="also measure llama.cpp's llama-server")
    parser.add_argument("--spec-method", default="dspark", choices=["dspark", "dflash"])
    add_engine_args(parser, ["model", "draft", "dtype", "num_threads", "max_num_seqs"],
                    {"model": "model directory ('' = the embedded default)",
                     "max_num_seqs": "0 = the largest concurrency"},
                    draft=str(DEFAULT_DRAFT), num_threads=2, max_num_seqs=0)
    parser.add_argument("--server-args", default="", help="extra flags for python -m server (one string)")
    parser.add_argument("--gguf", type=Path, default=peers.DEFAULT_PEERS_DIR / peers.DEFAULT_GGUF_NAME)
    parser.add_argument("--llama-ctx-per-slot", type=int, default=1024)
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for /health")
    parser.add_argument("--out", type=Path, default=Path("bench_out/serve_sweep"))
    return parser


class ServerProcess:
    """A server subprocess (its output in log_path) that is healthy inside the with-block and stopped after it."""

    def __init__(self, argv: list[str], url: str, log_path: Path, startup_timeout: float):
        self.argv, self.url, self.log_path, self.startup_timeout = argv, url, Path(log_path), startup_timeout
        self.proc = None

    def __enter__(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def wait_healthy(self):
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not healthy after {self.startup_timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, chars: int = 1500) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def max_num_seqs(args) -> int:
    return args.max_num_seqs or max(args.concurrency)


def our_server_argv(config: str, port: int, args) -> list[str]:
    argv = [sys.executable, "-m", "server", "--port", str(port), "--num-threads", str(args.num_threads),
            "--max-num-seqs", str(max_num_seqs(args)), "--dtype", args.dtype]
    argv += ["--model", args.model] if args.model else []
    if config == "none":
        argv += ["--spec-method", "none"]
    else:
        argv += ["--spec-method", args.spec_method, "--draft", args.draft, "--verify-policy", config]
    return argv + shlex.split(args.server_args)


def llama_server_argv(port: int, args) -> tuple[list[str] | None, str]:
    """argv for llama-server, or None and the reason it cannot run."""
    exe = peers.binary("llama-server")
    if not exe.is_file():
        return None, f"llama-server not built at {exe} (python -m bench.peers build)"
    if not Path(args.gguf).is_file():
        return None, f"bf16 GGUF not found at {args.gguf} (python -m bench.peers convert)"
    return peers.llama_server_command(args.gguf, port, args.num_threads, max_num_seqs(args),
                                      args.llama_ctx_per_slot), ""


def levels(args) -> list[tuple[int, int]]:
    """(concurrency, number of prompts) per load level."""
    counts = args.num_prompts_per_level or [max(8, 4 * c) for c in args.concurrency]
    if len(counts) == 1:
        counts = counts * len(args.concurrency)
    if len(counts) != len(args.concurrency):
        raise SystemExit("--num-prompts-per-level takes one count or one per --concurrency level")
    return list(zip(args.concurrency, counts))


def prompt_sets(prompts: list[str], args) -> list[list[list[str]]]:
    """[level][round] -> the prompts of that run: the first N every time, or with --fresh-prompts the next N that no
    earlier run sent."""
    counts = [n for _, n in levels(args) for _ in range(args.rounds)]
    starts = accumulate(counts, initial=0) if args.fresh_prompts else repeat(0)
    runs = [prompts[start:start + n] for start, n in zip(starts, counts)]
    return [runs[i:i + args.rounds] for i in range(0, len(runs), args.rounds)]


def sweep_servers(servers: dict[str, tuple[list[str], int]], prompts: list[str], warm: list[str], args,
                  bar) -> list[dict]:
    """Starts these servers (name -> (argv, port)), runs every load level args.rounds times on each, the servers
    taking turns, and stops them. A server that fails to start gives one error row."""
    rows, runs_per_server = [], len(levels(args)) * args.rounds
    with ExitStack() as stack:
        urls = {}
        for name, (argv, port) in servers.items():
            url = f"http://127.0.0.1:{port}"
            try:
                stack.enter_context(ServerProcess(argv, url, args.out / "logs" / f"{name.replace(':', '_')}.log",
                                                  args.startup_timeout))
                urls[name] = url
            except RuntimeError as e:
                tqdm.write(f"{name}: {e}")
                bar.update(runs_per_server)
                rows.append({"config": name, "error": str(e)})
        for (concurrency, n), sets in zip(levels(args), prompt_sets(prompts, args)):
            for round_index, level_prompts in enumerate(sets):
                names = list(urls)
                shift = round_index % max(1, len(names))
                for name in names[shift:] + names[:shift]:
                    bar.set_description(f"{name} c={concurrency} round {round_index + 1}")
                    opts = load_options(args, concurrency=concurrency, model="")
                    result = benchmark(urls[name], level_prompts, warm, opts, args.progress, f"{name} c={concurrency}")
                    rows.append({"config": name, "concurrency": concurrency, "num_prompts": n, "round": round_index,
                                 "summary": result["summary"], "server": result["server"]})
                    bar.update(1)
    return rows


def rounds_by_point(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(config, concurrency) -> its rows in round order (an error row has no concurrency)."""
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        runs.setdefault((r["config"], r.get("concurrency")), []).append(r)
    return runs


def median_rounds(rows: list[dict]) -> list[dict]:
    """Per (config, concurrency), the round with the median aggregate throughput (the lower one of an even count);
    error rows as they are. Order: configs as first seen, levels as run."""
    picked = []
    for group in rounds_by_point(rows).values():
        if "error" in group[0]:
            picked += group
            continue
        by_throughput = sorted(group, key=lambda r: r["summary"]["output_throughput"])
        picked.append(by_throughput[(len(group) - 1) // 2])
    return picked


def run(args) -> dict:
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    counts = [n for _, n in levels(args)]
    needed = sum(counts) * args.rounds if args.fresh_prompts else max(counts)
    prompts = load_prompts(args.dataset, needed + args.warmup, seed=args.seed)
    prompts, warm = prompts[:needed], prompts[needed:]
    runs = list(args.configs) + ([LLAMA] if args.llama_server else [])
    results = {"command": shlex.join(["python", "-m", "bench", *sys.argv[1:]]), "dataset": args.dataset,
               "max_tokens": args.max_tokens, "fresh_prompts": args.fresh_prompts, "temperature": args.temperature,
               "threads": args.num_threads, "max_num_seqs": max_num_seqs(args), "model": args.model or "default",
               "rounds": args.rounds, "rows": [], "skipped": {}}
    servers = {}
    for name in runs:
        port = free_port()
        argv, why = llama_server_argv(port, args) if name == LLAMA else (our_server_argv(name, port, args), "")
        if argv is None:
            tqdm.write(f"skipping {name}: {why}")
            results["skipped"][name] = why
        else:
            servers[name] = (argv, port)
    # one server at a time, or all of them at once when the rounds take turns
    groups = [dict([item]) for item in servers.items()] if args.rounds == 1 else [servers]
    all_rows = []
    with tqdm(total=len(servers) * len(args.concurrency) * args.rounds, desc="serve-sweep", dynamic_ncols=True) as bar:
        for group in groups:
            all_rows += sweep_servers(group, prompts, warm, args, bar)
    results["rows"] = median_rounds(all_rows)
    if args.rounds > 1:
        results["all_rounds"] = all_rows
        results["spread"] = throughput_spread(all_rows)
    return results


def throughput_spread(rows: list[dict]) -> dict[str, dict[int, list[float]]]:
    """config -> concurrency -> every round's aggregate throughput, in round order."""
    out: dict[str, dict[int, list[float]]] = {}
    for (config, concurrency), group in rounds_by_point(rows).items():
        if "error" not in group[0]:
            out.setdefault(config, {})[concurrency] = [r["summary"]["output_throughput"] for r in group]
    return out


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for r in results["rows"]:
        if "error" in r:
            rows.append([r["config"], "-", "error: see JSON", *["-"] * 6])
            continue
        s, server = r["summary"], r["server"] or {}
        rows.append([r["config"], str(r["concurrency"]), f"{s['successful_requests']}/{s['failed_requests']}",
                     fmt(s["output_throughput"], ".1f"), fmt(s["per_user_tok_s"]["mean"], ".1f"),
                     fmt(s["ttft_ms"]["median"], ".0f"), fmt(s["tpot_ms"]["median"], ".1f"),
                     fmt(server.get("acceptance_length")), fmt(server.get("mean_verify_budget"))])
    return rows


HEADER = ["config", "concurrency", "ok/failed", "output tok/s", "per-user tok/s", "median TTFT ms",
          "median TPOT ms", "acceptance length", "mean verify budget"]


def rounds_note(results: dict) -> str:
    if results.get("rounds", 1) == 1:
        return ""
    spread = [[name, str(c), " / ".join(f"{x:.1f}" for x in xs)]
              for name, per in results["spread"].items() for c, xs in per.items()]
    return (f"\nEach row: the round with the median output tok/s of {results['rounds']} (configurations taking turns). "
            f"Output tok/s of every round:\n\n{markdown_table(['config', 'concurrency', 'rounds'], spread)}\n")


def report(results: dict, out_dir: Path):
    from bench.serve_plot import plot_sweep
    rows = table_rows(results)
    save_and_print(results, out_dir / "serve_sweep.json", HEADER, rows)
    skipped = "".join(f"\nskipped {name}: {why}\n" for name, why in results["skipped"].items())
    (out_dir / "serve_sweep.md").write_text(
        f"`{results['command']}`\n\n{markdown_table(HEADER, rows)}\n{rounds_note(results)}{skipped}")
    for path in plot_sweep(results, out_dir):
        print(f"wrote {path}")
