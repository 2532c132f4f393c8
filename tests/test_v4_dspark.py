"""DeepSeek-V4's in-checkpoint DSpark module served with one flag: a tiny V4-Flash-DSpark-like checkpoint in the
released layout (tests/tiny_models.save_tiny_v4_dspark, an 8-token vocabulary so that a random draft is sometimes
right): the module is found without a draft path, its features are the target layers' outputs (checked against
transformers' own hidden states), greedy speculative output equals plain greedy output under every verify policy,
a draft made after rejections equals one made from scratch on the committed tokens, and the window is exactly
sliding_window positions wide."""
import pytest
import torch
from tiny_models import save_tiny_v4_dspark

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.drafter import Drafter
from engine.drafts import v4_stage
from engine.drafts.v4_dspark import V4DSparkDraft
from engine.sampler import SamplingTensors

VOCAB = 8
NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
POLICIES = ("full", "fixed:2", "sps", "sps-lagged")


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4d") / "tiny-v4-dspark"
    return path, save_tiny_v4_dspark(path, seed=3, vocab_size=VOCAB, block_size=4)


def prompts() -> list[list[int]]:
    """Lengths inside and past the 8-token sliding window (the draft's window too)."""
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (13, 3, 21, 9)]


def v4_llm(path, **options) -> LLM:
    return LLM(model=str(path), **{"dtype": "float32", "kv_cache_gb": 0.02, "kv_block_size": 8,
                                   "enable_prefix_caching": False} | options)


def test_the_module_is_found_without_a_draft_path(v4):
    path, _ = v4
    for method in ("auto", "dspark"):
        config = EngineConfig(model=str(path), spec_method=method, device="cpu")
        assert (config.spec_method, config.draft) == ("dspark", str(path))
    with pytest.raises(ValueError, match="needs a draft directory"):
        EngineConfig(model=str(path), spec_method="dflash", device="cpu")
    assert isinstance(v4_llm(path, spec_method="dspark").speculator.drafter.draft, V4DSparkDraft)


def test_features_are_the_target_layers_outputs_averaged_over_the_streams(v4, monkeypatch):
    """What the module reads for each committed position: transformers' decoder-layer outputs (the hc streams; read
    with hooks, as its hidden_states stop before the last layer's) at dspark_target_layer_ids, averaged over the
    streams and concatenated."""
    path, hf = v4
    seen = []
    queue = Drafter.queue_context
    monkeypatch.setattr(Drafter, "queue_context",
                        lambda self, seqs, features, n: (seen.append(features[0][:n[0]].clone()),
                                                         queue(self, seqs, features, n))[1])
    prompt = prompts()[2]
    v4_llm(path, spec_method="dspark").generate([prompt], SamplingParams(temperature=0, max_tokens=1),
                                                use_tqdm=False)
    outputs = {}
    hooks = [hf.model.layers[i].register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out))
             for i in (1, 2, 3)]
    with torch.no_grad():
        hf(torch.tensor([prompt]))
    for hook in hooks:
        hook.remove()
    assert outputs[1].shape[-2] == hf.config.hc_mult  # each decoder layer's output: the hc streams
    expected = torch.cat([outputs[i][0].mean(-2) for i in (1, 2, 3)], -1)
    torch.testing.assert_close(seen[0], expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_speculative_output_equals_plain_greedy(v4, policy):
    path, _ = v4
    expected = [o.token_ids for o in v4_llm(path, spec_method="none").generate(prompts(), GREEDY, use_tqdm=False)]
    llm = v4_llm(path, spec_method="dspark", verify_policy=policy)
    assert [o.token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)] == expected
    stats = llm.spec_stats.as_dict()
    if policy in ("full", "fixed:2"):  # drafts were accepted and rejected: rollback ran
        assert 0 < stats["num_accepted_tokens"] < stats["num_verified_tokens"]


def test_prefix_cache_hits_with_speculation_change_no_token(v4):
    """With the prefix cache on, requests whose 37-token prefix is cached start from its pages, the draft's K=V
    there and the target's rings saved at the block end; verify steps cross block ends and roll back past them:
    the same tokens as plain greedy decoding without a prefix cache."""
    path, _ = v4
    g = torch.Generator().manual_seed(7)
    base = torch.randint(0, VOCAB, (37,), generator=g).tolist()
    requests = [base + torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 6, 1)]
    expected = [o.token_ids for o in v4_llm(path, spec_method="none").generate(requests, GREEDY, use_tqdm=False)]
    llm = v4_llm(path, spec_method="dspark", verify_policy="full", enable_prefix_caching=True)
    outs = llm.generate(requests[:1], GREEDY, use_tqdm=False) + llm.generate(requests[1:], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert [o.num_cached_tokens for o in outs] == [0, 32, 32]
    stats = llm.spec_stats.as_dict()
    assert 0 < stats["num_accepted_tokens"] < stats["num_verified_tokens"]


def record_proposals(monkeypatch) -> list[tuple[list[int], int, torch.Tensor]]:
    """(the request's tokens, its rounds so far, its draft distributions) for every block drafted."""
    records, rounds = [], {}
    propose = Drafter.propose

    def recording(self, seqs, num_tokens=None):
        propose(self, seqs, num_tokens)
        for s in seqs:
            rounds[s.seq_id] = rounds.get(s.seq_id, -1) + 1
            records.append((list(s.token_ids), rounds[s.seq_id], s.proposal.probs.clone()))
    monkeypatch.setattr(Drafter, "propose", recording)
    return records


def test_a_draft_after_rejections_equals_one_from_scratch(v4, monkeypatch):
    """Each block drafted mid-generation (after rounds whose rejected drafts were rolled back) equals the first block
    a fresh engine drafts for the same committed tokens as its prompt (greedy: that engine commits the same next
    token, then drafts from it)."""
    path, _ = v4
    records = record_proposals(monkeypatch)
    v4_llm(path, spec_method="dspark", verify_policy="full").generate(prompts()[2:3], GREEDY, use_tqdm=False)
    later = [r for r in records if r[1] >= 3][:4]
    assert len(later) == 4
    for tokens, _, probs in later:
        del records[:]
        fresh = v4_llm(path, spec_method="dspark", verify_policy="full")
        fresh.generate([tokens[:-1]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        assert records[0][0] == tokens
        torch.testing.assert_close(records[0][2], probs, atol=1e-5, rtol=1e-5)


def own_window(n: int, window: int) -> torch.Tensor:
    """The slots of the last `window` positions before n when position p sits in slot p ([1, window], 0 before 0)."""
    return (n - window + torch.arange(window)).clamp_min(0)[None]


def draft_probs(draft: V4DSparkDraft, n: int, anchor: int) -> torch.Tensor:
    slots = own_window(n, draft.window)
    sampling = SamplingTensors.from_params([GREEDY])
    _, probs, *_ = draft.draft_block(torch.tensor([anchor]), torch.tensor([n]), slots, torch.tensor([n]),
                                     draft.config.block_size, sampling, torch.rand(1, draft.config.block_size), True)
    return probs


def test_the_window_is_sliding_window_positions_wide(v4):
    """With the committed K=V of n positions in slots 0..n-1, a draft at position n reads exactly the last
    sliding_window of them: changing the one just outside changes nothing; the one just inside (negative control:
    the comparison can fail) changes the draft."""
    path, _ = v4
    draft = v4_llm(path, spec_method="dspark").speculator.drafter.draft
    window, n = draft.window, 20
    draft.allocate_kv_cache(32, torch.float32, torch.device("cpu"))
    features = torch.randn(n, len(draft.config.target_layer_ids) * draft.v4.hidden_size,
                           generator=torch.Generator().manual_seed(0))
    draft.extend_context(features, torch.arange(n), torch.arange(n))
    before = draft_probs(draft, n, anchor=3)
    for cache in draft.kv_caches:
        cache[n - window - 1] += 1.0
    torch.testing.assert_close(draft_probs(draft, n, anchor=3), before, atol=0, rtol=0)
    for cache in draft.kv_caches:
        cache[n - window] += 1.0
    assert (draft_probs(draft, n, anchor=3) - before).abs().max() > 1e-3


# ---- the module's forward against a reference written here from its definition -------------------------------------

def fp8_rounded(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """The module's QAT from its definition: each group of 64 non-rope channels divided by the power of two at or
    above its absolute max / 448, rounded to float8_e4m3, multiplied back; the rope channels untouched."""
    out = kv.clone()
    for g in range(0, kv.shape[-1] - rope_dim, 64):
        part = kv[..., g:g + 64]
        scale = 2.0 ** torch.ceil(torch.log2(part.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448))
        out[..., g:g + 64] = (part / scale).to(torch.float8_e4m3fn).float() * scale
    return out


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class Reference:
    """Transformers' DeepseekV4DecoderLayer parts (mHC, norms, MoE, projections) for each stage, loaded from the
    checkpoint's `mtp.K.*` tensors by the released -> transformers renaming; the attention, the block, the window and
    the head written here: each block query attends over the stage's K=V of the last `window` committed positions
    (made from main_x) and every block position, with a per-head sink."""

    HEADS = ("main_proj", "main_norm", "hc_head_", "norm.", "markov_head", "confidence_head")

    def __init__(self, path, hf):
        import json

        from safetensors.torch import load_file
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m

        from engine.models.deepseek_v4.checkpoint import transformers_state_from_released
        raw = json.loads((path / "config.json").read_text())
        self.L, S = raw["num_hidden_layers"], len(raw["compress_ratios"]) - raw["num_hidden_layers"]
        stages = {"num_hidden_layers": self.L + S, "layer_types": hf.config.layer_types + ["sliding_attention"] * S,
                  "mlp_layer_types": hf.config.mlp_layer_types + ["moe"] * S}
        self.cfg = m.DeepseekV4Config(**(raw | stages))
        self.m, self.hf, self.state = m, hf, load_file(str(path / "model.safetensors"))
        self.stages = [self.stage(s, transformers_state_from_released) for s in range(S)]
        self.rope = m.DeepseekV4RotaryEmbedding(self.cfg)
        self.last = f"mtp.{S - 1}."

    def stage(self, s: int, rename):
        layer = self.m.DeepseekV4DecoderLayer(self.cfg, self.L + s).float().eval()
        prefix = f"mtp.{s}."
        own = {f"layers.{self.L + s}.{n[len(prefix):]}": t for n, t in self.state.items()
               if n.startswith(prefix) and not n[len(prefix):].startswith(self.HEADS)}
        hf_prefix = f"model.layers.{self.L + s}."
        missing, unexpected = layer.load_state_dict({n[len(hf_prefix):]: t for n, t in rename(own).items()},
                                                    strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        return layer

    def cos_sin(self, positions: torch.Tensor):
        return self.rope(torch.zeros(1), positions[None], layer_type="main")

    def kv(self, attn, x: torch.Tensor, cos, sin) -> torch.Tensor:
        kv = self.m.apply_rotary_pos_emb(attn.kv_norm(attn.kv_proj(x))[None, None], cos, sin)[0, 0]
        return fp8_rounded(kv, 2 * cos.shape[-1])

    def attention(self, attn, x: torch.Tensor, cos, sin, window_kv: torch.Tensor) -> torch.Tensor:
        G, H, D = x.shape[0], self.cfg.num_attention_heads, self.cfg.head_dim
        q = attn.q_b_norm(attn.q_b_proj(attn.q_a_norm(attn.q_a_proj(x))).view(G, H, D).transpose(0, 1)[None])
        q = self.m.apply_rotary_pos_emb(q, cos, sin)[0]
        keys = torch.cat([window_kv, self.kv(attn, x, cos, sin)])
        scores = q @ keys.T * D ** -0.5
        sink = attn.sinks.view(H, 1, 1).expand(H, G, 1)
        out = torch.cat([scores, sink], -1).softmax(-1)[..., :-1] @ keys          # [H, G, D]
        out = self.m.apply_rotary_pos_emb(out[None], cos, -sin)[0].transpose(0, 1)  # [G, H, D]
        return attn.o_b_proj(attn.o_a_proj(out.reshape(1, G, self.cfg.o_groups, -1)).flatten(2))[0]

    @torch.no_grad()
    def block(self, features: torch.Tensor, anchor: int, G: int):
        """features [n, k * hidden] of n committed positions -> (pre-norm hidden [G, hidden], base logits [G, V])."""
        n, eps, window = features.shape[0], self.cfg.rms_norm_eps, self.cfg.sliding_window
        main_x = rms(features @ self.state["mtp.0.main_proj.weight"].T, self.state["mtp.0.main_norm.weight"], eps)
        ctx_cos, ctx_sin = self.cos_sin(torch.arange(n))
        cos, sin = self.cos_sin(torch.arange(n, n + G))
        ids = torch.tensor([anchor] + [self.cfg.vocab_size - 1] * (G - 1))
        streams = self.hf.model.embed_tokens(ids)[None, :, None].expand(1, G, self.cfg.hc_mult, -1).contiguous()
        for layer in self.stages:
            window_kv = self.kv(layer.self_attn, main_x, ctx_cos, ctx_sin)[max(0, n - window):]
            post, comb, collapsed = layer.attn_hc(streams)
            out = self.attention(layer.self_attn, layer.input_layernorm(collapsed)[0], cos, sin, window_kv)
            streams = post.unsqueeze(-1) * out[None, :, None] + comb.transpose(-1, -2) @ streams
            post, comb, collapsed = layer.ffn_hc(streams)
            out = layer.mlp(layer.post_attention_layernorm(collapsed), input_ids=ids[None])
            streams = post.unsqueeze(-1) * out.unsqueeze(-2) + comb.transpose(-1, -2) @ streams
        head = self.m.DeepseekV4HyperHead(self.cfg)
        head.load_state_dict({k: self.state[self.last + "hc_head_" + k[3:]] for k in ("hc_fn", "hc_base", "hc_scale")})
        hidden = head(streams)[0]
        return hidden, self.hf.lm_head(rms(hidden, self.state[self.last + "norm.weight"], eps))


def target_features(hf, tokens: list[int], layer_ids) -> torch.Tensor:
    outputs = {}
    hooks = [hf.model.layers[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
             for i in layer_ids]
    with torch.no_grad():
        hf(torch.tensor([tokens]))
    for hook in hooks:
        hook.remove()
    return torch.cat([outputs[i][0].mean(-2) for i in layer_ids], -1)


def engine_and_reference(v4, n: int):
    """(engine's pre-norm hidden, base logits), (the reference's): a block drafted after n committed positions."""
    path, hf = v4
    draft = v4_llm(path, spec_method="dspark").speculator.drafter.draft
    tokens = torch.randint(0, VOCAB, (n + 1,), generator=torch.Generator().manual_seed(n)).tolist()
    features = target_features(hf, tokens[:n], draft.config.target_layer_ids)
    G = draft.config.block_size
    expected_hidden, expected_logits = Reference(path, hf).block(features, tokens[n], G)
    draft.allocate_kv_cache(32, torch.float32, torch.device("cpu"))
    draft.extend_context(features, torch.arange(n), torch.arange(n))
    hidden = draft.backbone(torch.tensor([tokens[n]]), torch.tensor([n]), own_window(n, draft.window),
                            torch.tensor([n]))[0]
    return (hidden, draft.vocab_logits(draft.mtp[-1].norm(hidden))), (expected_hidden, expected_logits)


@pytest.mark.parametrize("n", [5, 20])
def test_the_module_equals_a_reference_written_from_its_definition(v4, n):
    """A block drafted after n committed positions (inside and past the 8-position window), on the same target
    features: the engine's pre-norm hidden states and base logits equal the reference's."""
    (hidden, logits), (expected_hidden, expected_logits) = engine_and_reference(v4, n)
    assert (expected_logits.std() > 0.1) and (expected_logits[0] - expected_logits[1]).abs().max() > 1e-3
    torch.testing.assert_close(hidden, expected_hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)


def test_negative_control_without_the_fake_fp8_the_reference_disagrees(v4, monkeypatch):
    monkeypatch.setattr(v4_stage, "fake_fp8", lambda kv, rope_dim: kv)
    (_, logits), (_, expected_logits) = engine_and_reference(v4, 20)
    assert (logits - expected_logits).abs().max() > 1e-3


def test_sts_temperatures_come_from_beside_the_checkpoint_or_a_flag(v4, tmp_path):
    """A read-only checkpoint keeps its module uncalibrated (no sts.json beside it): calibration_file gives the STS
    temperatures and biases, and reload_calibration reads that file again; a missing file is an error naming it."""
    import json
    path, _ = v4
    assert torch.equal(v4_llm(path, spec_method="dspark").speculator.drafter.draft.confidence_head.temperatures,
                       torch.ones(4))
    sts = tmp_path / "sts.json"
    sts.write_text(json.dumps({"temperatures": [2.0, 1.0, 1.0, 0.5], "biases": [0.1, 0.0, 0.0, -0.2]}))
    llm = v4_llm(path, spec_method="dspark", calibration_file=str(sts))
    head = llm.speculator.drafter.draft.confidence_head
    assert head.temperatures.tolist() == [2.0, 1.0, 1.0, 0.5] and head.biases[3].item() == pytest.approx(-0.2)
    sts.write_text(json.dumps({"temperatures": [1.5, 1.0, 1.0, 1.0]}))
    assert llm.reload_calibration() == 2 and head.temperatures[0].item() == 1.5
    with pytest.raises(FileNotFoundError, match="calibration_file .*missing.json does not exist"):
        v4_llm(path, spec_method="dspark", calibration_file=str(tmp_path / "missing.json"))
