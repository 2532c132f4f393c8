"""`python -m bench sweep` on tiny models: every policy's engine up at once, the policies taking turns at each level
in a rotated order, the median repeat reported, and (greedy, lossless) the same tokens from every policy."""
import json
import sys

import pytest
from tiny_models import save_tiny_draft, save_tiny_model

import bench.sweep

POLICIES = ["none", "fixed:1", "full", "sps-lagged"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    target = save_tiny_model(root / "target", "llama")
    draft = save_tiny_draft(root / "dspark", target, rank=8, block_size=4)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["The quick brown fox", "Paris is the capital", "def add(a, b):", "numbers 0123"]))
    profile = root / "sps.json"  # flat: verifying more never costs more, so sps-lagged drafts and verifies
    profile.write_text(json.dumps({"step_cost_s": {"1": 0.01, "64": 0.01}, "draft_cost_s": {"1": 0.0}}))
    return target, draft, prompts, profile


def test_sweep_takes_turns_and_reports_median_repeats(tiny, tmp_path, monkeypatch):
    target, draft, prompts, profile = tiny
    calls, real_closed_loop = [], bench.sweep.closed_loop
    monkeypatch.setattr(bench.sweep, "closed_loop",
                        lambda llm, *args: calls.append(args[-1].split()[0]) or real_closed_loop(llm, *args))
    out = tmp_path / "out"
    argv = ["bench", "sweep", "--model", target, "--draft", draft, "--sps-profile", profile,
            "--policies", *POLICIES, "--concurrency", "1", "2", "--rounds", "2",
            "--repeats", "3", "--max-tokens", "6", "--dataset", f"jsonl:{prompts}",
            "--num-prompts", "4", "--num-threads", "1", "--kv-cache-gb", "0.05",
            "--out", out]
    monkeypatch.setattr(sys, "argv", [str(a) for a in argv])
    __import__("bench.__main__", fromlist=["main"]).main()
    turns = [POLICIES[i:] + POLICIES[:i] for i in range(3)]
    assert calls == [p for _ in (1, 2) for turn in turns for p in turn]  # rotated each repeat, at each level
    results = json.loads((out / "sweep.json").read_text())
    assert [(r["policy"], r["concurrency"]) for r in results["rows"]] == [(p, c) for c in (1, 2) for p in POLICIES]
    for row in results["rows"]:
        runs = [r for r in results["all_repeats"] if (r["policy"], r["concurrency"]) == (row["policy"],
                                                                                          row["concurrency"])]
        assert sorted(r["repeat"] for r in runs) == [0, 1, 2]
        assert row["throughputs"] == [r["throughput_tok_s"] for r in runs]
        assert row["throughput_tok_s"] == sorted(row["throughputs"])[1]
    # greedy and lossless: every policy and repeat emits the same number of tokens at a level; the drafting
    # policies really verified drafts
    for c in (1, 2):
        assert len({r["output_tokens"] for r in results["all_repeats"] if r["concurrency"] == c}) == 1
    at_1 = {r["policy"]: r for r in results["rows"] if r["concurrency"] == 1}
    assert at_1["none"]["mean_verify_budget"] == at_1["none"]["verified_per_round"] == 0
    assert at_1["fixed:1"]["verified_per_round"] == 1
    # per request and step: a request's first token (from its prefill) and its last step (no room left) verify none
    assert 0.4 < at_1["fixed:1"]["mean_verify_budget"] < 1
    assert at_1["full"]["mean_verify_budget"] > 1 and at_1["sps-lagged"]["mean_verify_budget"] > 0
    assert (out / "sweep.png").is_file()
