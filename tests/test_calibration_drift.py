"""Calibration drift, simulated on a tiny target and DSpark draft. A random draft's acceptance is no logistic function
of its confidence logits, so the simulation replaces verification by a known one: position k of a block is accepted
(given the ones before) with probability sigmoid((z_k + b_k) / T_k) of its raw confidence logit z_k. Rounds logged
while serving then refit the scaling to under 2% ECE on held-out rounds; serving with that file keeps the monitor
quiet (negative control), and with every temperature tripled makes it flag drift. Then the reload: over HTTP, under
load, greedy tokens unchanged (real verification)."""
import json
import shutil

import httpx
import numpy as np
import pytest
import torch
from tiny_models import save_tiny_draft, save_tiny_model

from engine import LLM, SamplingParams
from engine.calibration import Scaling, pooled_metrics, rounds_from_records, save_scaling
from engine.calibration_monitor import read_rounds
from engine.config import EngineConfig
from engine.drafts.loader import CALIBRATION_FILE
from engine.speculator import Speculator
from server.background import BackgroundServer
from server.factory import create_app
from train.sts import fit_sts

WINDOW = 4000
TRUE_T, TRUE_B = torch.tensor([2.0, 1.5, 1.0, 0.8]), torch.tensor([2.0, 1.5, 1.0, 0.5])


def simulated_verify(self, seqs, logits):
    """Accept each draft with the known probability, prefix-wise, from the request's own generator."""
    results = []
    for seq, rows in zip(seqs, logits):
        z = seq.proposal.confidence_logits[:len(seq.spec_token_ids)]
        keep = torch.rand(z.shape[0], generator=seq.generator) < torch.sigmoid((z + TRUE_B[:z.shape[0]]) /
                                                                                TRUE_T[:z.shape[0]])
        accepted = int(keep.long().cumprod(0).sum())
        results.append((accepted, int(rows[accepted].argmax())))
    return results


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    target = save_tiny_model(root / "target", "qwen3")
    return target, save_tiny_draft(root / "dspark", target, rank=8, block_size=4)


def prompts(seed: int, n: int = 48) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 300, (int(torch.randint(4, 24, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def serve(target, draft, seed: int, **options) -> LLM:
    """128 sampled requests of 250 tokens with every drafted position verified (~10,000 rounds)."""
    llm = LLM(model=str(target), dtype="float32", spec_method="dspark", draft=str(draft), verify_policy="full",
              kv_cache_gb=0.1, max_num_seqs=128, calibration_window=WINDOW, seed=seed, **options)
    params = [SamplingParams(temperature=1.0, max_tokens=250, ignore_eos=True, seed=seed * 1000 + i)
              for i in range(128)]
    llm.generate(prompts(seed, 128), params, use_tqdm=False)
    return llm


def with_scaling(draft, root, scaling: Scaling):
    copy = root / "draft"
    shutil.copytree(draft, copy, dirs_exist_ok=True)
    save_scaling(copy / CALIBRATION_FILE, scaling)
    return copy


def test_logged_rounds_refit_the_scaling_and_the_monitor_sees_drift(models, tmp_path, monkeypatch):
    target, draft = models
    monkeypatch.setattr(Speculator, "verify", simulated_verify)
    log = tmp_path / "rounds.jsonl"
    served = serve(target, draft, seed=1, log_spec_rounds=str(log))
    served.speculator.round_log.flush()
    assert served.stats().calibration.rounds == WINDOW
    rows = read_rounds(log)
    assert len(rows) == served.spec_stats.num_drafts > 2 * WINDOW
    order = np.random.default_rng(0).permutation(len(rows))
    fit_rows, held_out = [rows[i] for i in order[: len(rows) // 2]], [rows[i] for i in order[len(rows) // 2:]]
    scaling = fit_sts(rounds_from_records(fit_rows, 4), with_bias=True)
    assert pooled_metrics(rounds_from_records(held_out, 4), scaling)["ece"] < 0.02
    assert pooled_metrics(rounds_from_records(held_out, 4))["ece"] > 0.1  # the raw head is far off

    fitted = serve(target, with_scaling(draft, tmp_path / "good", scaling), seed=2).stats().calibration
    assert fitted.pooled_ece < 0.05 and not fitted.drifting
    tripled = Scaling(scaling.temps * 3, scaling.biases)
    drifted = serve(target, with_scaling(draft, tmp_path / "bad", tripled), seed=2).stats().calibration
    assert drifted.pooled_ece > 0.05 and drifted.drifting


def test_reload_over_http_under_load(models, tmp_path):
    """Requests stream while the calibration is reloaded: all complete with the plain greedy tokens, the new version
    shows in /metrics, and without the API key the reload is refused."""
    target, draft = models
    draft = with_scaling(draft, tmp_path, Scaling(np.ones(4), np.zeros(4)))
    expected = [o.text for o in LLM(model=str(target), dtype="float32", spec_method="none", kv_cache_gb=0.05)
                .generate(prompts(3, 8), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)]
    config = EngineConfig(model=str(target), dtype="float32", spec_method="dspark", draft=str(draft),
                          verify_policy="threshold:0.3", kv_cache_gb=0.05)
    key = {"Authorization": "Bearer k"}
    with BackgroundServer(create_app(config, "tiny", api_key="k")) as s, httpx.Client(base_url=s.url, headers=key,
                                                                                       timeout=60) as client:
        streams = [client.stream("POST", "/v1/completions", json={"prompt": p, "max_tokens": 30, "temperature": 0,
                                                                  "ignore_eos": True, "stream": True})
                   for p in prompts(3, 8)]
        responses = [stream.__enter__() for stream in streams]
        save_scaling(draft / CALIBRATION_FILE, Scaling(np.full(4, 2.0), np.full(4, -1.0)))
        assert httpx.post(s.url + "/admin/reload-calibration").status_code == 401
        reloaded = client.post("/admin/reload-calibration")
        assert reloaded.status_code == 200 and reloaded.json() == {"calibration_version": 2}
        texts = []
        for response, stream in zip(responses, streams):
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
            texts.append("".join(c["choices"][0]["text"] for c in chunks if c["choices"]))
            stream.__exit__(None, None, None)
        metrics = client.get("/metrics").text
    assert "dspark:calibration_version{model_name=\"tiny\"} 2.0" in metrics
    assert texts == expected


def test_bench_drift_samples_the_monitor_and_logs_every_round(models, tmp_path):
    from argparse import Namespace

    from bench import drift
    target, draft = models
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("\n".join(json.dumps({"prompt": f"say {i} and then some more"}) for i in range(8)))
    args = Namespace(model=str(target), draft=str(draft), verify_policy="full", num_threads=1, max_num_seqs=8, seed=0,
                     calibration_window=50, log_spec_rounds=str(tmp_path / "rounds.jsonl"),
                     dataset=f"jsonl:{prompts_file}", num_prompts=8, max_tokens=40, max_prompt_tokens=64,
                     temperature=1.0, sample_every=20)
    result = drift.run(args)
    drift.report(result, tmp_path / "out")
    rounds = read_rounds(tmp_path / "rounds.jsonl")
    assert result["series"] and result["series"][-1]["rounds"] <= len(rounds)
    assert result["final"]["rounds"] == min(50, len(rounds))
    assert (tmp_path / "out" / "drift.png").stat().st_size > 1000
    assert result["monitor_cost"]["record_us"] > 0
