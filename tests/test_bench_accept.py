"""`python -m train calibrate` and `python -m bench accept` end to end on tiny models, and the math prompt set."""
import json
import sys

import pytest
from tiny_models import save_tiny_draft, save_tiny_model

from engine.drafts.loader import CALIBRATION_FILE, read_calibration
from engine.prompt_sets import load_prompts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("accept")
    target = save_tiny_model(root / "target", "llama")
    drafts = {"dspark": save_tiny_draft(root / "dspark", target, rank=8, block_size=4),
              "dflash": save_tiny_draft(root / "dflash", target, rank=0, confidence=False, block_size=4)}
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["The quick brown fox", "Paris is the capital", "def add(a, b):", "numbers 0123"]))
    return target, drafts, prompts


def run_cli(monkeypatch, module, argv: list[str]):
    monkeypatch.setattr(sys, "argv", [module] + [str(a) for a in argv])
    __import__(f"{module}.__main__", fromlist=["main"]).main()


def test_math_prompt_set():
    prompts = load_prompts("math")
    assert len(prompts) >= 40 and all(p.endswith("?") for p in prompts)
    assert len(load_prompts("math", 5, seed=1)) == 5


def test_calibrate_cli(tiny, tmp_path, monkeypatch, capsys):
    target, drafts, prompts = tiny
    draft = tmp_path / "draft"
    draft.mkdir()
    for f in drafts["dspark"].iterdir():
        (draft / f.name).write_bytes(f.read_bytes())
    out, records = tmp_path / "out", tmp_path / "records.jsonl"
    common = ["--draft", draft, "--model", target, "--dtype", "float32", "--kv-cache-gb", "0.01", "--out", out]
    run_cli(monkeypatch, "train", ["calibrate", *common, "--prompts", f"jsonl:{prompts}", "--num-prompts", 4,
                                   "--max-tokens", 24, "--save-records", records])
    temps, biases = read_calibration(draft, 4)
    assert (temps > 0).all() and biases.abs().max() > 0  # the default affine fit moves the tiny head's logits
    metrics = json.loads((out / "sts_metrics.json").read_text())
    assert metrics["num_rounds"] == len(records.read_text().splitlines()) > 0
    assert len(metrics["before"]) == len(metrics["after"]) == 4
    assert (out / "sts_reliability.png").stat().st_size > 0
    assert "ECE before" in capsys.readouterr().out
    (draft / CALIBRATION_FILE).unlink()
    run_cli(monkeypatch, "train", ["calibrate", *common, "--from-records", records])  # refit without rolling out
    assert [t.tolist() for t in read_calibration(draft, 4)] == [temps.tolist(), biases.tolist()]


def test_bench_accept_cli(tiny, tmp_path, monkeypatch, capsys):
    target, drafts, prompts = tiny
    (drafts["dspark"] / CALIBRATION_FILE).write_text(json.dumps({"temperatures": [2.0, 1.0, 1.0, 0.5]}))
    run_cli(monkeypatch, "bench", ["accept", "--model", target, "--drafts", f"dspark:{drafts['dspark']}",
                                   f"dflash:{drafts['dflash']}", "--domains", f"tiny=jsonl:{prompts}", "--num-prompts",
                                   3, "--max-tokens", 8, "--dtype", "float32", "--kv-cache-gb", "0.01",
                                   "--speed", "--speed-prompts", 1, "--out", tmp_path])
    results = json.loads((tmp_path / "accept.json").read_text())
    rows = results["rows"]
    assert [(r["method"], r["temperature"]) for r in rows] == [("dspark", 0.0), ("dspark", 1.0), ("dflash", 0.0),
                                                               ("dflash", 1.0)]
    for r in rows:
        assert r["tau"] >= 1 and len(r["conditional_acceptance"]) == 4  # full verification of 4-token blocks
        if r["temperature"] == 0 and r["stats"]["num_accepted_tokens"] == 0:
            assert r["conditional_acceptance"] == [0.0, None, None, None]
        assert ("pooled_before" in r) == ("pooled_after" in r) == (r["method"] == "dspark")
    dspark = rows[0]
    assert dspark["pooled_before"]["n"] == sum(dspark["stats"]["verified_per_pos"])
    assert [m["position"] for m in dspark["confidence_after"]] == [1, 2, 3, 4]
    assert [s["label"].split()[0] for s in results["speed"]] == ["plain", "dspark", "dflash"]
    assert (tmp_path / "accept.png").stat().st_size > 0
    assert "conditional acceptance" in (tmp_path / "accept.md").read_text()
    assert "ECE before" in capsys.readouterr().out
