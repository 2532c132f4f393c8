"""Choosing a draft's vocabulary (python -m train draft-vocab): frequencies, mixing, EOS, coverage, the file the
engine reads. (Drafting among the chosen ids: tests/test_draft_reference.py, test_spec_decode.py and
test_spec_lossless.py.)"""
import json
from argparse import Namespace
from collections import Counter

import pytest
from tiny_models import save_tiny_draft, save_tiny_model

from engine.drafts.loader import read_draft_vocab
from train.draft_vocab import coverage, rank_tokens, supervised_token_counts, with_token, write_draft_vocab

ROWS = [{"input_ids": [1, 2, 3, 3, 4], "loss_mask": [0, 0, 1, 1, 1]},
        {"input_ids": [2, 3, 5, 5, 5], "loss_mask": [0, 1, 1, 1, 0]}]


def test_supervised_counts_only_answer_tokens():
    assert supervised_token_counts(ROWS) == Counter({3: 3, 4: 1, 5: 2})


def test_rank_mixes_normalised_frequencies():
    own, other = Counter({3: 3, 4: 1, 5: 2}), Counter({9: 8, 4: 2})  # shares: 3 .5, 4 1/6, 5 1/3 | 9 .8, 4 .2
    assert rank_tokens([(own, 1.0)]) == [3, 5, 4]
    # 0.5 weights: 3 .25, 4 (1/6 + .2) / 2 = .183, 5 .167, 9 .4
    assert rank_tokens([(own, 0.5), (other, 0.5)]) == [9, 3, 4, 5]
    assert rank_tokens([(Counter({7: 1, 2: 1}), 1.0)]) == [2, 7]  # ties: the smaller id first


def test_eos_is_always_in_and_coverage_counts_tokens():
    assert with_token([5, 6, 7, 8], 0, 3) == [5, 6, 0]
    assert with_token([5, 0, 7, 8], 0, 3) == [5, 0, 7]
    assert with_token([5, 6], None, 3) == [5, 6]
    assert coverage([3, 5], Counter({3: 3, 4: 1, 5: 2})) == pytest.approx(5 / 6)


def test_write_draft_vocab_then_the_engine_reads_it(tmp_path):
    target = save_tiny_model(tmp_path / "target", "qwen3")
    draft = save_tiny_draft(tmp_path / "draft", target)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 3 + [{"input_ids": [6, 4], "loss_mask": [0, 1]}]))
    args = Namespace(draft=str(draft), model=str(target), size=3, data=str(data), data_weight=1.0, held_out=1,
                     sharegpt_replies=0)
    path = write_draft_vocab(args)
    written = json.loads(path.read_text())
    assert written["token_ids"] == [3, 5, 0]  # 4 is fourth; EOS (id 0) takes the last place
    assert written["held_out_coverage"] == 0.0  # the held-out row's only answer token is 4
    assert read_draft_vocab(draft, 0, 320).tolist() == [3, 5, 0]
    assert read_draft_vocab(draft, 2, 320).tolist() == [3, 5]
    with pytest.raises(SystemExit, match="not a draft directory"):
        write_draft_vocab(Namespace(**{**vars(args), "draft": str(tmp_path)}))


def test_acceptance_probe_hand_computed():
    """bench draft-vocab's probe: one request with 2 drafts (3 target rows) and one with none."""
    import torch

    from bench.draft_vocab import AcceptanceProbe, summary
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7], [1.0, 0, 0, 0], [0.25] * 4])
    q = torch.tensor([[0.25] * 4, [0.0, 0.5, 0.0, 0.5]])
    probe = AcceptanceProbe({2: torch.tensor([0, 3])}, lambda *args: "verified")
    assert probe(p, q, torch.tensor([0, 1]), torch.tensor([2, 0]), None, None) == "verified"
    # row 1: every token 0.25 + 0.25 + 0.2 + 0 = 0.7; top 2 {0, 3}: q -> (0.5, 0, 0, 0.5), 0.5 + 0 = 0.5
    # row 2: every token 0 + 0.1 + 0 + 0.5 = 0.6; q -> (0, 0, 0, 1): 0.7; inside: 0.5 and 0.8
    assert [(j, round(a, 6), {k: round(v, 6) for k, v in alpha.items()}, {k: round(v, 6) for k, v in m.items()})
            for j, a, alpha, m in probe.rows] == [(0, 0.7, {2: 0.5}, {2: 0.5}), (1, 0.6, {2: 0.7}, {2: 0.8})]
    pooled = summary({"rows": probe.rows, "sizes": [2]})[-1]
    assert pooled["position"] == "all" and pooled["alpha"] == pytest.approx(0.65)
    assert pooled["alpha_2"] == pytest.approx(0.6) and pooled["inside_2"] == pytest.approx(0.65)


def test_restricting_a_draft_packed_for_the_cpu_repacks_its_slices(tmp_path):
    """gpu-check restricts a draft after the engine built (and, on CPU, packed) it: the sliced LM head and Markov
    projection must compute with their own rows, not the stale packed copies of the whole vocabulary."""
    import torch

    from engine import LLM
    target = save_tiny_model(tmp_path / "target", "qwen3")
    llm = LLM(model=str(target), dtype="bfloat16", spec_method="dspark", kv_cache_gb=0.01,
              draft=str(save_tiny_draft(tmp_path / "draft", target)))
    draft = llm.model_runner.drafter.draft
    ids = torch.tensor([7, 3, 200, 11])
    hidden, latent = torch.randn(128, 64).bfloat16(), torch.randn(128, 8)  # > 96 rows: the packed GEMM path
    with torch.inference_mode():
        want_logits = draft.target[1](hidden).float()[:, ids]
        want_bias = draft.markov_head.project(latent)[:, ids]
        draft.restrict_vocab(ids)
        torch.testing.assert_close(draft.vocab_logits(hidden), want_logits)
        torch.testing.assert_close(draft.markov_head.project(latent), want_bias)
