"""`python -m train calibrate --from-rounds` and `python -m bench calibration` on rounds logged the way a server logs
them (engine.calibration_monitor.RoundLog), drawn from a known truth: the head's raw logit z_k at position k, and the
target accepts position k with probability σ((z_k + b_k) / T_k) given it accepted every earlier one."""
import json
import sys
from unittest import mock

import numpy as np
import pytest

from engine.calibration import (
    Scaling,
    load_scaling,
    pooled_metrics,
    position_metrics,
    rounds_from_records,
    save_scaling,
)
from engine.calibration_monitor import RoundLog, read_rounds
from engine.drafts.loader import CALIBRATION_FILE

BLOCK = 4
TRUTH = Scaling(np.array([3.0, 0.5, 2.0, 1.0]), np.array([1.5, -1.0, 0.5, -0.5]))


def draw_rounds(n: int, seed: int, shuffled: bool = False) -> list[dict]:
    """n rounds from the truth: a tenth drafted fewer than BLOCK tokens, half verified a random prefix (a planner's
    choice) and the rest all; shuffled moves each round's verified / accepted lengths to another round's logits (the
    labels then say nothing about the logits)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(1.5, 2.0, size=(n, BLOCK))
    ok = rng.random((n, BLOCK)) < TRUTH.confidences(z)
    first_fail = np.where(ok.all(1), BLOCK, np.argmin(ok, axis=1))
    drafted = np.where(rng.random(n) < 0.1, rng.integers(1, BLOCK + 1, n), BLOCK)
    verified = np.where(rng.random(n) < 0.5, drafted, 1 + (rng.random(n) * drafted).astype(np.int64))
    accepted = np.minimum(first_fail, verified)
    if shuffled:
        order = rng.permutation(n)
        verified = np.minimum(verified[order], drafted)
        accepted = np.minimum(accepted[order], verified)
    return [{"logits": z[i, :drafted[i]].tolist(), "drafted": int(drafted[i]), "verified": int(verified[i]),
             "accepted": int(accepted[i])} for i in range(n)]


def log_rounds(path, rounds: list[dict], rotate_after: int | None = None):
    """Write rounds as the server does; rotate_after: move the first that many to PATH.1."""
    log = RoundLog(path)
    for i, r in enumerate(rounds):
        if i == rotate_after:
            log.rotate()
        log.write(r["logits"], r["drafted"], r["verified"], r["accepted"])
    log.flush()
    return path


def cli(module: str, argv: list) -> None:
    with mock.patch.object(sys, "argv", [module] + [str(a) for a in argv]):
        __import__(f"{module}.__main__", fromlist=["main"]).main()


def make_draft(path, block_size: int = BLOCK):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"block_size": block_size}))
    return path


def refit(draft, *logs, out=None, holdout=0.5, seed=0) -> dict:
    """The refit through the CLI; sts.json's contents."""
    cli("train", ["calibrate", "--draft", draft, "--from-rounds", *logs, "--holdout", holdout, "--seed", seed]
        + (["--out", out] if out else []))
    return json.loads(((out or draft / CALIBRATION_FILE)).read_text())


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """20000 logged rounds refitted (half held out), and 10000 fresh rounds the fit never saw."""
    root = tmp_path_factory.mktemp("refit")
    draft = make_draft(root / "draft")
    sts = refit(draft, log_rounds(root / "rounds.jsonl", draw_rounds(20000, seed=1)))
    fresh = log_rounds(root / "fresh.jsonl", draw_rounds(10000, seed=2))
    return draft, sts, fresh


def test_refit_from_logged_rounds_brings_held_out_ece_under_2_percent(fitted):
    draft, sts, fresh = fitted
    assert (sts["source"], sts["num_rounds"], sts["num_held_out_rounds"]) == ("logged rounds", 20000, 10000)
    assert sts["pooled_ece_held_out_before"] > 0.05  # the raw logits are far off
    assert sts["pooled_ece_held_out"] < 0.02
    scaling = load_scaling(draft / CALIBRATION_FILE, BLOCK)
    assert scaling.temps[:2] == pytest.approx(TRUTH.temps[:2], rel=0.15)
    assert scaling.biases[:2] == pytest.approx(TRUTH.biases[:2], abs=0.3)
    # on rounds drawn afresh from the same truth: the file written does what its metadata says
    rounds = rounds_from_records(read_rounds(fresh), BLOCK)
    raw, after, truth = (pooled_metrics(rounds, s)["ece"] for s in (None, scaling, TRUTH))
    assert raw > 0.05 and after < 0.02 and after < truth + 0.01
    metrics = json.loads((draft / "sts_metrics.json").read_text())
    assert all(m["auroc"] > 0.65 for m in metrics["held_out"])  # the head carries signal, per position
    assert [m["ece"] for m in metrics["held_out"]] == sts["ece_held_out"]
    assert (draft / "sts_reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_refit_of_mislabelled_rounds_recovers_no_signal(tmp_path):
    """Negative control: the same rounds with each one's lengths moved to another round's logits."""
    draft = make_draft(tmp_path / "draft")
    sts = refit(draft, log_rounds(tmp_path / "shuffled.jsonl", draw_rounds(20000, seed=1, shuffled=True)))
    held_out = json.loads((draft / "sts_metrics.json").read_text())["held_out"]
    assert all(abs(m["auroc"] - 0.5) < 0.03 for m in held_out)  # no ordering learnt: at best the base rates
    assert sts["num_held_out_rounds"] == 10000 and all(m["n"] > 2000 for m in held_out)


def test_rotated_log_is_read_oldest_first(tmp_path, capsys):
    rounds = draw_rounds(400, seed=3)
    rotated = log_rounds(tmp_path / "rotated.jsonl", rounds, rotate_after=150)
    single = log_rounds(tmp_path / "single.jsonl", rounds)
    assert len((tmp_path / "rotated.jsonl.1").read_text().splitlines()) == 150
    assert read_rounds(rotated) == read_rounds(single)
    assert [r["verified"] for r in read_rounds(rotated)] == [r["verified"] for r in rounds]
    draft = make_draft(tmp_path / "draft")
    a = refit(draft, rotated, out=tmp_path / "a" / "sts.json", holdout=0.2, seed=5)
    b = refit(draft, single, out=tmp_path / "b" / "sts.json", holdout=0.2, seed=5)
    assert (a["temperatures"], a.get("biases")) == (b["temperatures"], b.get("biases"))
    assert (a["num_rounds"], a["num_held_out_rounds"]) == (400, 80)
    assert (tmp_path / "a" / "sts_metrics.json").is_file() and (tmp_path / "a" / "sts_reliability.png").is_file()
    assert not (draft / CALIBRATION_FILE).exists()  # --out FILE.json: the draft's own sts.json is left alone
    out = capsys.readouterr().out
    assert "held-out rounds (80)" in out and "ECE before" in out
    two = refit(draft, rotated, single, out=tmp_path / "c.json")  # several logs: every round of each
    assert two["num_rounds"] == 800
    every = refit(draft, single, out=tmp_path / "d.json", holdout=0)  # no held-out rounds: cross-validated halves
    assert every["num_held_out_rounds"] == 0 and len(every["ece_held_out"]) == BLOCK
    assert "pooled_ece_held_out" not in every


@pytest.mark.parametrize("command", ["train", "bench"])
def test_refused_logs(tmp_path, command):
    draft = make_draft(tmp_path / "draft")

    def run(log):
        argv = (["calibrate", "--draft", draft, "--from-rounds", log] if command == "train"
                else ["calibration", "--draft", draft, "--from-rounds", log, "--out", tmp_path / "out"])
        cli(command, argv)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="no logged rounds"):
        run(empty)
    with pytest.raises(SystemExit, match="no such round log"):
        run(tmp_path / "missing.jsonl")
    longer = log_rounds(tmp_path / "longer.jsonl", draw_rounds(5, seed=0) + [
        {"logits": [0.1] * (BLOCK + 1), "drafted": BLOCK + 1, "verified": 2, "accepted": 1}])
    with pytest.raises(SystemExit, match=f"round 5 has {BLOCK + 1} confidence logits but the draft's block_size is "
                                         f"{BLOCK}"):
        run(longer)
    bad = log_rounds(tmp_path / "bad.jsonl", [{"logits": [0.1] * BLOCK, "drafted": BLOCK, "verified": 1,
                                               "accepted": 2}])
    with pytest.raises(SystemExit, match="round 0 is inconsistent"):
        run(bad)
    assert not (draft / CALIBRATION_FILE).exists()


def test_bench_calibration_diagram_of_raw_and_refitted(fitted, tmp_path, capsys):
    draft, _, fresh = fitted
    rounds = rounds_from_records(read_rounds(fresh), BLOCK)
    own = draft / CALIBRATION_FILE
    cli("bench", ["calibration", "--from-rounds", fresh, "--draft", draft, "--out", tmp_path / "default"])
    results = json.loads((tmp_path / "default" / "calibration.json").read_text())
    assert [c["name"] for c in results["curves"]] == ["raw", str(own)]  # the draft's own sts.json by default
    truth = save_scaling(tmp_path / "truth.json", TRUTH)
    cli("bench", ["calibration", "--from-rounds", fresh, "--sts", own, truth, "--out", tmp_path])
    results = json.loads((tmp_path / "calibration.json").read_text())
    assert results["num_rounds"] == 10000 and results["num_positions"] == BLOCK
    for curve, scaling in zip(results["curves"], [None, load_scaling(own), TRUTH]):
        assert curve["pooled"] == pooled_metrics(rounds, scaling)  # engine.calibration's numbers, exactly
        assert curve["positions"] == position_metrics(rounds, scaling)
        counts = curve["reliability"]["count"]
        assert sum(counts) == curve["pooled"]["n"]
        gap = np.abs(np.subtract(curve["reliability"]["predicted"], curve["reliability"]["realised"]))
        assert float(np.dot(counts, gap) / sum(counts)) == pytest.approx(curve["pooled"]["ece"])
    raw, refitted = results["curves"][0]["pooled"]["ece"], results["curves"][1]["pooled"]["ece"]
    assert raw > 0.05 and refitted < 0.02
    assert (tmp_path / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert f"| all | {results['curves'][0]['pooled']['n']} |" in table and f"{refitted:.4f}" in table
    with pytest.raises(SystemExit, match="no such file"):
        cli("bench", ["calibration", "--from-rounds", fresh, "--sts", tmp_path / "nope.json", "--out", tmp_path])

