"""python -m bench.step_inputs: the host time of a decode step's attention inputs at long contexts (the varlen batch:
every request's key slots, attention_inputs.varlen_batch, which the Triton path and DeepSeek-V4's fixed-shape step
read), four requests of about `context` tokens each in blocks of 256; medians. On CPU the expansion of the block
tables runs on the host too; on a GPU it runs on the device and the host builds only the tables."""
import argparse
import statistics
import time

import torch

from engine.attention_inputs import varlen_batch
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BLOCK = 256


def requests(context: int, count: int = 4) -> list[Sequence]:
    seqs = []
    for i in range(count):
        seq = Sequence([1] * 8, SamplingParams())
        blocks = context // BLOCK + 1
        seq.block_table = list(range(i * blocks, (i + 1) * blocks))
        seq.num_computed_tokens, seq.num_scheduled_tokens = context - 1000 * i - 1, 1
        seqs.append(seq)
    return seqs


def measure(contexts, device: torch.device, repeats: int) -> dict:
    out = {}
    for context in contexts:
        seqs, times = requests(context), []
        for _ in range(repeats):
            start = time.perf_counter()
            varlen_batch(seqs, BLOCK, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        out[context] = statistics.median(times)
    return out


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.step_inputs", description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 131072, 1048576])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    result = measure(args.contexts, torch.device(args.device), args.repeats)
    print("| context per request | varlen batch of 4 requests, ms |\n|---:|---:|")
    for context, ms in result.items():
        print(f"| {context:,} | {ms:.1f} |")


if __name__ == "__main__":
    main()
