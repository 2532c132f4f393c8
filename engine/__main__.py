"""`python -m engine --prompt ...`: stream a chat answer from the engine (the embedded default model by default).
`python -m engine --model DIR --plan [--tensor-parallel-size N] [--expert-parallel] [--memory-gb G]`: print a
DeepSeek-V4 deployment plan (weights and KV per device) from DIR's config.json, without loading weights."""
import argparse
import sys
import time

from engine.cli import add_engine_args, config_from_args
from engine.llm import LLM
from engine.models.deepseek_v4.plan import add_plan_args, print_plan
from engine.sampling_params import SamplingParams


def main():
    parser = add_engine_args(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--prompt", action="append", help="user message (repeatable); default: read stdin lines")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = add_plan_args(parser).parse_args()
    if args.plan:
        return print_plan(args)
    llm = LLM(config_from_args(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    for prompt in args.prompt or (line.strip() for line in sys.stdin if line.strip()):
        print(f">>> {prompt}")
        start, n = time.perf_counter(), 0
        for out in llm.stream(llm.chat_prompt([{"role": "user", "content": prompt}]), params):
            print(out.delta_text, end="", flush=True)
            n += len(out.delta_token_ids)
        print(f"\n[{n} tokens, {n / (time.perf_counter() - start):.1f} tok/s]")


if __name__ == "__main__":
    main()
