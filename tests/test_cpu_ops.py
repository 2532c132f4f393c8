"""kernels/cpu_ops (fused CPU decode ops) against their plain-torch twins, in fp32 and bf16."""
import pytest
import torch
import torch.nn.functional as F
from test_triton_sampling_kernels import markov_case, vocab_case

from engine import LLM, SamplingParams
from engine.models.decoder import Attention
from engine.models.layers import apply_rotary
from kernels import cpu_ops, markov
from kernels.attention import attention_mask, paged_attention, store_kvcache

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="cpu kernels unavailable")

DTYPES = (torch.float32, torch.bfloat16)


def assert_matches(out: torch.Tensor, ref: torch.Tensor):
    """fp32: summation order only. bf16: at most one bf16 rounding step apart, and almost always identical
    (the twin's intermediate roundings are reproduced, so only near-ties may round the other way)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        return
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=1e-3)
    assert (out == ref).float().mean() > 0.97


def twin_rms_norm(x, w, eps):
    return F.rms_norm(x.float(), w.shape, eps=eps).to(x.dtype) * w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (7, 64), (3, 2, 100)])
def test_rms_norm(dtype, shape):
    torch.manual_seed(0)
    x, w = (torch.randn(shape) * 3).to(dtype), (torch.rand(shape[-1]) + 0.5).to(dtype)
    assert_matches(cpu_ops.rms_norm(x, w, 1e-5), twin_rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_silu_mul(dtype, rows):
    torch.manual_seed(1)
    gate_up = (torch.randn(rows, 2 * 96) * 4).to(dtype)
    gate, up = gate_up.split(96, dim=-1)
    assert_matches(cpu_ops.silu_mul(gate_up), F.silu(gate) * up)


def attention_module(family: str, dtype: torch.dtype) -> Attention:
    c = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "head_dim": 16, "rms_norm_eps": 1e-6}
    torch.manual_seed(2)
    attn = Attention(c, family).to(dtype)
    if attn.qk_norm:
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.data = (torch.rand(16) + 0.5).to(dtype)
    return attn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_norm_rope(dtype, family):
    attn = attention_module(family, dtype)
    rows = 6
    qkv = (torch.randn(rows, (4 + 2 * 2) * 16) * 2).to(dtype)
    angles = torch.randn(rows, 1, 8) * 10
    cos, sin = (torch.cat([f(angles), f(angles)], -1).to(dtype) for f in (torch.cos, torch.sin))
    q, k, v = attn.fused_norm_rope(qkv, cos, sin)
    q_ref, k_ref, v_ref = attn.norm_rope(qkv, cos, sin)
    assert_matches(q, q_ref.contiguous())
    assert_matches(k, k_ref.contiguous())
    assert torch.equal(v, v_ref)
    if family == "llama":  # the twin itself, spelled out: rotate_half over the whole head
        x1, x2 = qkv.view(rows, 8, 16)[:, :4].chunk(2, -1)
        assert_matches(q, (qkv.view(rows, 8, 16)[:, :4] * cos + torch.cat([-x2, x1], -1) * sin))
        assert_matches(q, apply_rotary(qkv.view(rows, 8, 16)[:, :4], cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_skips_padding_slots(dtype):
    torch.manual_seed(3)
    k, v = torch.randn(5, 2, 8).to(dtype), torch.randn(5, 2, 8).to(dtype)
    slots = torch.tensor([4, -1, 0, 9, -1])
    ours = [torch.randn(2, 12, 8) for _ in range(2)]
    twin = [c.clone() for c in ours]
    cpu_ops.store_kv(k, v, *ours, slots)
    store_kvcache(k, v, *twin, slots)
    assert torch.equal(ours[0], twin[0]) and torch.equal(ours[1], twin[1])
    untouched = [s for s in range(12) if s not in (4, 0, 9)]
    assert torch.equal(ours[0][:, untouched], twin[0][:, untouched])


def paged_case(q_lens, kv_lens, dtype, seed=4, D=16):
    """Random cache with each sequence's keys at scattered slots, and the queries of their newest tokens."""
    torch.manual_seed(seed)
    H, Hkv, S = 6, 2, 128
    k_cache, v_cache = torch.randn(Hkv, S, D), torch.randn(Hkv, S, D)
    perm = torch.randperm(S)
    lmax, offset, kv_slots = max(kv_lens), 0, []
    for n in kv_lens:
        kv_slots.append(torch.cat([perm[offset:offset + n], torch.zeros(lmax - n, dtype=torch.long)]))
        offset += n
    q = (torch.randn(sum(q_lens), H, D) * 2).to(dtype)
    row_seq = torch.tensor([b for b, ql in enumerate(q_lens) for _ in range(ql)])
    row_limit = torch.tensor([n - ql + i + 1 for ql, n in zip(q_lens, kv_lens) for i in range(ql)])
    return q, k_cache, v_cache, torch.stack(kv_slots), row_seq, row_limit


def twin_attention(q, k_cache, v_cache, kv_slots, q_lens, kv_lens, scale):
    outs, row = [], 0
    for b, (ql, n) in enumerate(zip(q_lens, kv_lens)):
        mask = attention_mask([ql], [n])
        outs.append(paged_attention(q[None, row:row + ql], k_cache, v_cache, kv_slots[b:b + 1, :n], mask, scale)[0])
        row += ql
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_lens,kv_lens", [([1], [1]), ([1, 1, 1], [9, 30, 4]), ([3, 1, 8], [10, 25, 8]),
                                            ([16], [70])])
def test_paged_attention(dtype, q_lens, kv_lens):
    q, k_cache, v_cache, kv_slots, row_seq, row_limit = paged_case(q_lens, kv_lens, dtype)
    out = cpu_ops.paged_attention(q, k_cache, v_cache, kv_slots, row_seq, row_limit, 0.25)
    assert_matches(out, twin_attention(q, k_cache, v_cache, kv_slots, q_lens, kv_lens, 0.25))


@pytest.mark.parametrize("head_dim", [64, 128, 72, 12])
def test_paged_attention_head_dims(head_dim):
    """The vectorised dot products and value sums (head_dim % 8 == 0, in 64-wide chunks, four keys at a time with a
    tail) and the plain loops (head_dim % 8 != 0)."""
    q_lens, kv_lens = [8, 1, 3], [37, 6, 70]
    q, k_cache, v_cache, kv_slots, row_seq, row_limit = paged_case(q_lens, kv_lens, torch.float32, D=head_dim)
    out = cpu_ops.paged_attention(q, k_cache, v_cache, kv_slots, row_seq, row_limit, head_dim ** -0.5)
    assert_matches(out, twin_attention(q, k_cache, v_cache, kv_slots, q_lens, kv_lens, head_dim ** -0.5))


def test_paged_attention_negative_control():
    """One key fewer per row is a different answer: the comparison above can fail."""
    q_lens, kv_lens = [3, 1], [10, 25]
    q, k_cache, v_cache, kv_slots, row_seq, row_limit = paged_case(q_lens, kv_lens, torch.float32)
    out = cpu_ops.paged_attention(q, k_cache, v_cache, kv_slots, row_seq, row_limit - 1, 0.25)
    ref = twin_attention(q, k_cache, v_cache, kv_slots, q_lens, kv_lens, 0.25)
    assert not torch.allclose(out, ref, rtol=1e-3, atol=1e-3)


def test_bad_input_raises_named_errors():
    q, k_cache, v_cache, kv_slots, row_seq, row_limit = paged_case([2], [5], torch.float32)
    with pytest.raises(RuntimeError, match="slot"):
        cpu_ops.paged_attention(q, k_cache, v_cache, kv_slots + 1000, row_seq, row_limit, 0.25)
    with pytest.raises(RuntimeError, match="limit"):
        cpu_ops.paged_attention(q, k_cache, v_cache, kv_slots, row_seq, row_limit + 10, 0.25)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops.store_kv(torch.randn(1, 2, 16), torch.randn(1, 2, 16), k_cache, v_cache, torch.tensor([500]))
    with pytest.raises(RuntimeError, match="weight"):
        cpu_ops.rms_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6)


def test_training_keeps_the_differentiable_twins():
    x = torch.randn(2, 8, requires_grad=True)
    assert not cpu_ops.usable(x)
    with torch.inference_mode():
        assert cpu_ops.usable(x)


def short_query_step(model_dir):
    """A bf16 engine with three requests whose prompts are cached, scheduled for one verify-like step of 1-5 rows."""
    llm = LLM(model=str(model_dir), dtype="bfloat16", kv_cache_gb=0.01, kv_block_size=4)
    prompts = [list(range(5, 30)), list(range(40, 47)), list(range(60, 100))]
    seqs = [llm.sequences[llm.add_request(p, SamplingParams(max_tokens=8))] for p in prompts]
    for seq, cached, scheduled in zip(seqs, (20, 3, 35), (5, 1, 4)):
        llm.block_manager.allocate(seq, cached)
        seq.num_scheduled_tokens = cached
        llm.model_runner.forward([seq], [0])
        seq.num_computed_tokens = cached
        llm.block_manager.allocate(seq, cached + scheduled)
        seq.num_scheduled_tokens = scheduled
    return llm, seqs


def assert_stack_equals_layers(llm, seqs, monkeypatch, capture_layers: tuple[int, ...]) -> list[torch.Tensor]:
    """The step through the C++ stack (asserted taken) bitwise equals it through the Python layers; its logits."""
    model, runner = llm.model_runner.model, llm.model_runner
    calls = []
    stack_of = model.fused_stack
    monkeypatch.setattr(model, "fused_stack", lambda h: calls.append(stack_of(h)) or calls[-1])
    logits, features = runner.forward(seqs, [5, 1, 4], capture_layers=capture_layers)
    assert calls and calls[0] is not None
    monkeypatch.setattr(model, "fused_stack", lambda h: None)
    ref_logits, ref_features = runner.forward(seqs, [5, 1, 4], capture_layers=capture_layers)
    for ours, ref in zip(logits + features, ref_logits + ref_features):
        assert torch.equal(ours, ref)
    monkeypatch.setattr(model, "fused_stack", stack_of)
    return logits


def test_decoder_stack_equals_the_layer_by_layer_path(tiny_model_dir, monkeypatch):
    """The C++ stack chains the same fused ops as the Python layers (which test_engine_parity checks against
    transformers), so logits and captured features of a short-query step are bitwise the same."""
    llm, seqs = short_query_step(tiny_model_dir)
    model, runner = llm.model_runner.model, llm.model_runner
    assert model.layers[0].self_attn.qkv_proj.use_kernel
    logits = assert_stack_equals_layers(llm, seqs, monkeypatch, (-1, 0, 2))
    # one row fewer for the last request: its first rows are unchanged (causal, batch invariant), and the check can
    # fail: they differ from the rows one position later
    seqs[2].num_scheduled_tokens = 3
    shorter = runner.forward(seqs, [5, 1, 3])[0][2]
    assert torch.equal(shorter, logits[2][:3]) and not torch.equal(shorter, logits[2][1:])


@pytest.mark.parametrize("w1_dtype", [torch.float32, torch.bfloat16])
def test_fused_markov_sampler_matches_twin(w1_dtype):
    """The whole sequential block in C++ against kernels.markov (1000 columns: 31 full 32-column chunks and a tail;
    a greedy request whose top logits tie, and three sampled ones)."""
    base, anchors, w1, w2, temperature, uniforms = markov_case([0.0, 0.7, 1.0, 0.3], G=7)
    w1 = w1.to(w1_dtype)
    tokens, probs = cpu_ops.markov_sample(base, anchors, w1, w2.t().contiguous(), temperature, uniforms)
    want_tokens, want_probs = markov.markov_sample(base, anchors, w1, w2, temperature, uniforms)
    assert tokens.dtype == torch.int64 and tokens.tolist() == want_tokens.tolist()
    torch.testing.assert_close(probs, want_probs, atol=1e-6, rtol=1e-5)
    assert tokens[0, 0] == 10 and probs[0, 0, 10] == 1.0  # ties go to the first index
    # negative control: the comparison above fails for a sampler without the Markov bias
    unbiased, _ = cpu_ops.markov_sample(base, anchors, w1, torch.zeros(w2.shape[1], w2.shape[0]), temperature,
                                        uniforms)
    assert (unbiased != tokens).any()


def test_fused_markov_sampler_on_a_draft_vocabulary():
    (base, anchors, w1, w2, temperature, uniforms, ids), _, _ = vocab_case([0.0, 0.7, 1.0], G=6, size=600)
    tokens, probs = cpu_ops.markov_sample(base, anchors, w1, w2.t().contiguous(), temperature, uniforms, ids)
    want_tokens, want_probs = markov.markov_sample(base, anchors, w1, w2, temperature, uniforms, ids)
    assert tokens.tolist() == want_tokens.tolist()
    torch.testing.assert_close(probs, want_probs, atol=1e-6, rtol=1e-5)
    assert set(tokens.flatten().tolist()) <= set(ids.tolist())  # token ids, not column indices
    with pytest.raises(RuntimeError, match="vocab_ids"):
        cpu_ops.markov_sample(base, anchors, w1, w2.t().contiguous(), temperature, uniforms, ids[:-1])


def test_fused_markov_sampler_never_draws_a_zero_probability_token():
    """Draws at the very top of the CDF, with the last columns impossible: the last possible token, never a later one
    (the chunked running sums round differently from a cumsum)."""
    base, anchors, w1, w2, temperature, _ = markov_case([0.7, 1.0, 1.0], G=5, seed=3)
    base[:, :, -37:] = -float("inf")
    uniforms = torch.full((3, 5), 1.0 - 2.0 ** -24)
    tokens, probs = cpu_ops.markov_sample(base, anchors, w1, w2.t().contiguous(), temperature, uniforms)
    drawn = probs.gather(2, tokens[:, :, None]).squeeze(2)
    assert (drawn > 0).all() and (tokens < base.shape[2] - 37).all()


def test_draft_context_through_the_fused_ops_equals_the_torch_path(tmp_path, monkeypatch):
    """The draft's context K/V written through the target's C++ norm + rotary + store is bitwise what the torch ops
    write; the check can fail: the same rows at other positions give other keys."""
    from tiny_models import save_tiny_draft, save_tiny_model

    from engine.drafts.dspark import DraftAttention
    target = save_tiny_model(tmp_path / "target", "qwen3")
    draft_dir = save_tiny_draft(tmp_path / "draft", target, block_size=4)
    llm = LLM(model=str(target), dtype="bfloat16", spec_method="dspark", draft=str(draft_dir), kv_cache_gb=0.01)
    draft = llm.model_runner.drafter.draft
    torch.manual_seed(0)
    features = torch.randn(5, draft.fc.weight.shape[1]).bfloat16()
    positions, slots = torch.tensor([0, 1, 2, 7, 30]), torch.tensor([3, 4, 5, 9, 17])

    def caches(**kw):
        for layer in draft.layers:
            layer.self_attn.k_cache.zero_(), layer.self_attn.v_cache.zero_()
        with torch.inference_mode():
            draft.extend_context(features, kw.get("positions", positions), slots)
        return [t.clone() for layer in draft.layers for t in (layer.self_attn.k_cache, layer.self_attn.v_cache)]
    calls = []
    fused_context = DraftAttention.fused_context
    monkeypatch.setattr(DraftAttention, "fused_context", lambda self, x: calls.append(fused_context(self, x))
                        or calls[-1])
    fused = caches()
    assert calls and all(calls)
    monkeypatch.setattr(DraftAttention, "fused_context", lambda self, x: False)
    reference = caches()
    assert all(torch.equal(a, b) for a, b in zip(fused, reference))
    assert any(t[:, slots].abs().sum() > 0 for t in fused)
    shifted = caches(positions=positions + 1)
    assert not torch.equal(shifted[0], reference[0]) and torch.equal(shifted[1], reference[1])  # keys rotate, values not
