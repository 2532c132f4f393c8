"""DeepSeek-V4's math (engine/models/deepseek_v4) against transformers 5.24's DeepseekV4ForCausalLM on tiny random
configs: every attention kind (window, CSA with its indexer, HCA), hash and routed MoE layers, hc_mult 4, top-k below
the expert count, a window shorter than the sequence, plain and yarn rope. The weights go through the released
checkpoint's names. Negative controls show the comparison notices a missing sink, yarn or indexer."""
import json

import pytest
import torch
from tiny_models import V4_KINDS as KINDS
from tiny_models import tiny_v4
from transformers import DeepseekV4ForCausalLM

from engine.models.deepseek_v4.checkpoint import released_state_from_transformers
from engine.models.deepseek_v4.model import V4Model

TOLERANCE = 2e-5  # fp32, logits of magnitude ~3: summation order differs (einsum vs bmm, per-expert loops)


def ours_from(hf: DeepseekV4ForCausalLM, **config_changes) -> V4Model:
    model = V4Model(json.loads(hf.config.to_json_string()) | config_changes)
    model.load_state_dict(released_state_from_transformers(hf.state_dict()), strict=True)
    return model.eval()


@torch.no_grad()
def max_gap(hf, ours, ids: torch.Tensor) -> float:
    return (hf(ids[None], use_cache=False).logits[0] - ours.forward_sequence(ids)).abs().max().item()


@pytest.mark.parametrize("overrides", [
    {},
    {"rope_parameters": None},                                          # plain rope on the compressed layers too
    {"hc_mult": 2, "sliding_window": 16, "index_topk": 8, "num_experts_per_tok": 3},
    {"layer_types": KINDS[::-1], "mlp_layer_types": ["hash_moe"] * 2 + ["moe"] * 2, "o_groups": 4},
])
def test_logits_equal_transformers_over_a_whole_sequence(overrides):
    """40 tokens cross several compression windows (4 and 8) and the 8- or 16-token sliding window."""
    hf = tiny_v4(**overrides)
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1))
    assert max_gap(hf, ours_from(hf), ids) < TOLERANCE


def test_each_part_is_checked():
    """Negative controls: without the sinks, without yarn on the compressed layers, or with an indexer that keeps
    every entry, the logits differ from transformers' by far more than the tolerance."""
    hf = tiny_v4()
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1))
    no_sink = ours_from(hf)
    for layer in no_sink.layers:
        layer.attn.attn_sink.data.fill_(-1e9)
    assert max_gap(hf, no_sink, ids) > 100 * TOLERANCE
    assert max_gap(hf, ours_from(hf, rope_parameters=None), ids) > 100 * TOLERANCE
    assert max_gap(hf, ours_from(hf, index_topk=1000), ids) > 100 * TOLERANCE


@torch.no_grad()
def test_greedy_tokens_equal_transformers_generate_with_its_cache():
    """transformers' generate keeps V4's compressor state in its cache; our whole-sequence forward recomputes it
    each step. 48 greedy tokens agree, so the stateless path is a sound oracle for the engine's cached one."""
    hf = tiny_v4(seed=3)
    ours = ours_from(hf)
    prompt = torch.randint(0, 320, (13,), generator=torch.Generator().manual_seed(2))
    expected = hf.generate(prompt[None], max_new_tokens=48, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, 13:].tolist()
    ids = prompt
    for _ in range(48):
        ids = torch.cat([ids, ours.forward_sequence(ids)[-1].argmax().view(1)])
    assert ids[13:].tolist() == expected


@torch.no_grad()
def test_a_position_never_depends_on_later_tokens():
    """Logits at positions < n are the same whether the sequence stops at n or goes on: what the engine's cached,
    chunked path relies on. Two indexer heads make exact score ties (every head's ReLU at zero) common; the indexer
    breaks them toward the earlier entry, so the choice cannot depend on how many entries exist (torch.topk's tie
    order does: with it, position 19 of this sequence changed by 1.8 between a 20- and a 33-token sequence)."""
    hf = tiny_v4(seed=3, layer_types=["compressed_sparse_attention"] * 4, index_n_heads=2)
    ours = ours_from(hf)
    ids = torch.randint(0, 320, (33,), generator=torch.Generator().manual_seed(2))
    full = ours.forward_sequence(ids)
    for n in (5, 16, 19, 20, 24, 29):
        torch.testing.assert_close(ours.forward_sequence(ids[:n]), full[:n], atol=TOLERANCE, rtol=0)
