"""python -m bench.v4_tiny: batch-1 greedy decode of a tiny random DeepSeek-V4 (tests/tiny_models.save_tiny_v4,
seed 3: hidden 64, 4 layers of window / CSA / HCA / CSA, 8 experts top-2, hc_mult 4, fp32) through our engine and
through transformers' DeepseekV4ForCausalLM.generate with its own cache, alternating prompt by prompt on the same
threads; tokens per wall second, medians, and whether the greedy tokens agree."""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine import LLM, SamplingParams


def tiny_v4(path: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_models import save_tiny_v4
    return save_tiny_v4(path, seed=3).eval()


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(2, 320, (int(13 + 17 * i / max(1, n - 1)),), generator=g).tolist() for i in range(n)]


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.v4_tiny", description=__doc__)
    parser.add_argument("--prompts", type=int, default=6, help="the first is a warm-up, not counted")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf = tiny_v4(Path(tmp) / "tiny-v4")
        llm = LLM(model=str(Path(tmp) / "tiny-v4"), dtype="float32", num_threads=args.num_threads)
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        ours, theirs, same = [], [], True
        for i, prompt in enumerate(prompts(args.prompts)):
            start = time.perf_counter()
            tokens = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
            ours.append(len(tokens) / (time.perf_counter() - start))
            start = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt]), max_new_tokens=args.max_tokens, do_sample=False,
                                  min_new_tokens=args.max_tokens)[0, len(prompt):].tolist()
            theirs.append(len(out) / (time.perf_counter() - start))
            same &= out == tokens
        ours, theirs = ours[1:], theirs[1:]
        print(f"ours tok/s:         {', '.join(f'{x:.0f}' for x in ours)}  median {statistics.median(ours):.1f}")
        print(f"transformers tok/s: {', '.join(f'{x:.0f}' for x in theirs)}  median {statistics.median(theirs):.1f}")
        print(f"ratio {statistics.median(ours) / statistics.median(theirs):.2f}x; identical greedy tokens: {same}")


if __name__ == "__main__":
    main()
