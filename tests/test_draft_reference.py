"""The engine's DSpark / DFlash draft against an independent reference written here in plain torch from the DeepSpec
equations (reference/deepspec.md §1-2): it reads the draft's safetensors itself, takes context features from
transformers' own target model (output_hidden_states) over the committed tokens, and recomputes the block backbone,
the sequential heads, q = softmax(logits / T) and the confidence head. Engine proposals are made by the engine itself
(prefill, then verify steps extending the draft context), so the check covers the whole feature path. Also: the
loader's refusals (target copies, sizes, target layers), the sharded layout and STS confidence temperatures."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_draft, save_tiny_model
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams

PROB_ATOL = 1e-5   # q rows (fp32 softmax over 320 tokens)
CONF_ATOL = 1e-5   # confidences
PROMPT = [17, 250, 3, 99, 41, 8, 120, 77, 203, 5, 64, 31, 150]
LOGIT_ATOL = 1e-4  # T * |log q - log q_ref|: the step logits, up to fp32 rounding
OBSERVED = {"q": 0.0, "logit": 0.0, "confidence": 0.0, "proposals": 0}  # largest differences seen (printed with -s)


# ----------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    return {fam: save_tiny_model(tmp_path_factory.mktemp(fam), fam) for fam in ("qwen3", "llama")}


def make_draft(path: Path, target_dir: Path, **kw) -> Path:
    """save_tiny_draft, with the embed_tokens / lm_head copies written as separate tensors. (save_tiny_draft's own
    copies alias one tensor for a tied target, which safetensors refuses to save.)"""
    tied = json.loads((target_dir / "config.json").read_text()).get("tie_word_embeddings", False)
    if not tied or not kw.get("with_target_copies", True):
        return save_tiny_draft(path, target_dir, **kw)
    save_tiny_draft(path, target_dir, **{**kw, "with_target_copies": False})
    tensors = load_file(str(path / "model.safetensors"))
    embed = load_file(str(target_dir / "model.safetensors"))["model.embed_tokens.weight"]
    tensors |= {"embed_tokens.weight": embed.clone(), "lm_head.weight": embed.clone()}
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module", autouse=True)
def report_differences():
    yield
    print(f"\nmax |q - q_ref| = {OBSERVED['q']:.3g}, max T|log q - log q_ref| = {OBSERVED['logit']:.3g}, "
          f"max |c - c_ref| = {OBSERVED['confidence']:.3g} "
          f"over {OBSERVED['proposals']} proposals")


@pytest.fixture(scope="module")
def hf_targets(targets):
    return {fam: AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
            for fam, d in targets.items()}


# ---------------------------------------------------------------------------------------------------- reference
def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope(x, positions, theta):
    """x [T, H, D] at positions [T]: HF Qwen3 default RoPE (rotate_half convention)."""
    D = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D)
    freqs = positions.float()[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    return x * cos + rotate_half(x) * sin


class Reference:
    """DeepSpec's Qwen3DSparkModel forward + heads, straight from the checkpoint tensors."""

    def __init__(self, draft_dir: Path, hf_target):
        self.c = json.loads((draft_dir / "config.json").read_text())
        self.W = load_file(str(draft_dir / "model.safetensors"))
        self.target = hf_target
        c = self.c
        self.eps = c["rms_norm_eps"]
        self.theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
        self.H, self.Hkv = c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = c.get("head_dim") or c["hidden_size"] // self.H
        self.G = c["block_size"]
        self.rank = c.get("markov_rank", 0)
        self.head_type = c.get("markov_head_type", "vanilla")
        vocab_file = draft_dir / "draft_vocab.json"  # the token ids it may propose (FR-Spec); else every token
        self.columns = (torch.tensor(json.loads(vocab_file.read_text())["token_ids"]) if vocab_file.is_file()
                        else torch.arange(c["vocab_size"]))

    @torch.no_grad()
    def features(self, tokens: list[int]) -> torch.Tensor:
        """concat_l hidden_states[l + 1] of the target over tokens, in target_layer_ids order -> [n, L * h]."""
        hs = self.target(torch.tensor([tokens]), output_hidden_states=True).hidden_states
        return torch.cat([hs[l + 1][0] for l in self.c["target_layer_ids"]], dim=-1)

    def linear(self, x, name, bias=False):
        y = x @ self.W[name + ".weight"].T
        return y + self.W[name + ".bias"] if bias else y

    @torch.no_grad()
    def block_hidden(self, context: list[int], anchor: int) -> torch.Tensor:
        """Post-final-norm hidden states [G, h] of [anchor, mask x (G-1)] at positions len(context)..."""
        W, eps, H, Hkv, hd, G = self.W, self.eps, self.H, self.Hkv, self.hd, self.G
        start = len(context)
        ctx = rms_norm(self.features(context) @ W["fc.weight"].T, W["hidden_norm.weight"], eps)
        x = W["embed_tokens.weight"][torch.tensor([anchor] + [self.c["mask_token_id"]] * (G - 1))]
        q_pos, kv_pos = torch.arange(start, start + G), torch.arange(start + G)
        for i in range(self.c["num_hidden_layers"]):
            p = f"layers.{i}."
            xn = rms_norm(x, W[p + "input_layernorm.weight"], eps)
            q = rms_norm(self.linear(xn, p + "self_attn.q_proj").view(G, H, hd), W[p + "self_attn.q_norm.weight"], eps)
            k = torch.cat([self.linear(ctx, p + "self_attn.k_proj"), self.linear(xn, p + "self_attn.k_proj")])
            v = torch.cat([self.linear(ctx, p + "self_attn.v_proj"), self.linear(xn, p + "self_attn.v_proj")])
            k = rms_norm(k.view(start + G, Hkv, hd), W[p + "self_attn.k_norm.weight"], eps)
            q, k = rope(q, q_pos, self.theta), rope(k, kv_pos, self.theta)
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.view(start + G, Hkv, hd).repeat_interleave(H // Hkv, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * hd ** -0.5   # no mask: block sees context and block
            attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(G, H * hd)
            x = x + self.linear(attn, p + "self_attn.o_proj")
            xn = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
            x = x + self.linear(F.silu(self.linear(xn, p + "mlp.gate_proj")) * self.linear(xn, p + "mlp.up_proj"),
                                p + "mlp.down_proj")
        return rms_norm(x, W["norm.weight"], eps)

    def base_logits(self, hidden):
        """Logits over the whole vocabulary, -inf for tokens the draft may not propose."""
        logits = hidden @ self.W["lm_head.weight"].T
        return torch.full_like(logits, -float("inf")).index_copy_(1, self.columns, logits[:, self.columns])

    @torch.no_grad()
    def step_logits(self, hidden: torch.Tensor, prevs: list[int]) -> torch.Tensor:
        """Sequential-head logits [n, V], teacher-forced with prevs[k] (the token before draft k)."""
        base = self.base_logits(hidden)
        if not self.rank:
            return base
        w1, w2 = self.W["markov_head.markov_w1.weight"], self.W["markov_head.markov_w2.weight"]
        state = torch.zeros(self.rank)
        rows = []
        for k, prev in enumerate(prevs):
            e, h = w1[prev], hidden[k]
            if self.head_type == "vanilla":
                bias = w2 @ e
            elif self.head_type == "gated":
                gate = torch.sigmoid(self.linear(torch.cat([h, e]), "markov_head.gate_proj", bias=True))
                bias = w2 @ (gate * e)
            else:  # rnn
                g, cand, o = self.linear(torch.cat([state, e, h]), "markov_head.joint_proj", bias=True).chunk(3)
                state = torch.sigmoid(g) * state + (1 - torch.sigmoid(g)) * torch.tanh(cand)
                bias = w2 @ torch.tanh(o)
            rows.append(base[k] + bias)
        return torch.stack(rows)

    @torch.no_grad()
    def confidence(self, hidden: torch.Tensor, prevs: list[int], temperatures=None) -> torch.Tensor:
        feats = torch.cat([hidden, self.W["markov_head.markov_w1.weight"][torch.tensor(prevs)]], dim=-1)
        z = self.linear(feats, "confidence_head.proj", bias=True).squeeze(-1)
        if temperatures is not None:
            z = z / torch.tensor(temperatures[:len(prevs)])
        return torch.sigmoid(z)


def ref_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / temperature, dim=-1)


def inverse_cdf(q_row: torch.Tensor, u: float) -> int:
    """The first token whose cumulative mass exceeds u * total."""
    cdf = q_row.double().cumsum(0)
    return int((cdf <= u * cdf[-1]).sum().clamp_max(q_row.shape[0] - 1))


# ---------------------------------------------------------------------------------------------------- harness
def spec_llm(target_dir, draft_dir, method="dspark", **options) -> LLM:
    return LLM(model=str(target_dir), spec_method=method, draft=str(draft_dir),
               **{"dtype": "float32", "kv_cache_gb": 0.01, **options})


def propose_and_check(llm: LLM, ref: Reference, seqs, temperature: float, temperatures=None):
    """Run the engine's propose on seqs and compare each proposal with the reference recomputed from its committed
    tokens (context = all tokens before the anchor; anchor = the last token)."""
    snapshots = [s.generator.get_state() for s in seqs]
    llm.model_runner.drafter.propose(seqs)
    gamma = llm.model_runner.drafter.num_draft_tokens
    for seq, state in zip(seqs, snapshots):
        assert seq.num_computed_tokens == len(seq.token_ids) - 1
        context, anchor = seq.token_ids[:-1], seq.token_ids[-1]
        prop = seq.proposal
        cols = ref.columns  # the engine's probs are over the draft's vocabulary, in its order
        assert len(prop.tokens) == gamma and prop.probs.shape == (gamma, len(cols))
        hidden = ref.block_hidden(context, anchor)[:gamma]   # the full block runs even when gamma < G
        prevs = [anchor] + prop.tokens[:-1]
        q = ref_probs(ref.step_logits(hidden, prevs), temperature)
        assert q[:, cols].sum(-1).allclose(torch.ones(gamma))
        q = q[:, cols]
        diff = (prop.probs.float() - q).abs().max().item()
        assert diff < PROB_ATOL, f"q differs by {diff}"
        if temperature == 0:
            assert prop.tokens == cols[q.argmax(-1)].tolist()
        else:
            live = q > 1e-30
            ldiff = temperature * (prop.probs.float()[live].log() - q[live].log()).abs().max().item()
            assert ldiff < LOGIT_ATOL, f"step logits differ by {ldiff}"
            OBSERVED["logit"] = max(OBSERVED["logit"], ldiff)
            g = torch.Generator()
            g.set_state(state)
            u = torch.rand(gamma, generator=g)
            assert prop.tokens == [int(cols[inverse_cdf(q[k], u[k].item())]) for k in range(gamma)]
        if ref.rank and ref.c.get("enable_confidence_head"):
            c = ref.confidence(hidden, prevs, temperatures)
            cdiff = (prop.confidence.float() - c).abs().max().item()
            assert cdiff < CONF_ATOL, f"confidence differs by {cdiff}"
        else:
            cdiff = 0.0
            assert prop.confidence is None
        OBSERVED["q"] = max(OBSERVED["q"], diff)
        OBSERVED["confidence"] = max(OBSERVED["confidence"], cdiff)
        OBSERVED["proposals"] += 1


def run_and_check(llm, ref, prompts, temperature, steps, temperatures=None):
    """Prefill (first token seeds the draft context), then at every decode step check the proposal the engine is
    about to verify. Returns the seqs."""
    params = SamplingParams(temperature=temperature, seed=1234, max_tokens=200, ignore_eos=True)
    ids = [llm.add_request(p, params) for p in prompts]
    seqs = [llm.sequences[i] for i in ids]
    while not all(s.is_decoding for s in seqs):
        llm.step()
    for _ in range(steps):
        propose_and_check(llm, ref, seqs, temperature, temperatures)
        llm.step()   # verifies exactly the checked proposals, extends the draft context by anchor + accepted
    propose_and_check(llm, ref, seqs, temperature, temperatures)
    return seqs


# ------------------------------------------------------------------------------------------------------- tests
CASES = [  # (target, head or "dflash", temperature)
    ("qwen3", "vanilla", 1.0), ("qwen3", "gated", 1.0), ("qwen3", "rnn", 1.0), ("qwen3", "vanilla", 0.0),
    ("llama", "vanilla", 0.7), ("llama", "gated", 0.0), ("llama", "rnn", 1.0),
    ("qwen3", "dflash", 1.0), ("llama", "dflash", 0.0),
]


@pytest.mark.parametrize("family,head,temperature", CASES)
def test_proposals_match_reference(tmp_path, targets, hf_targets, family, head, temperature):
    dflash = head == "dflash"
    draft = make_draft(tmp_path / "draft", targets[family], rank=0 if dflash else 8, confidence=not dflash,
                       head_type="vanilla" if dflash else head, block_size=4, seed=3)
    llm = spec_llm(targets[family], draft, "dflash" if dflash else "dspark")
    ref = Reference(draft, hf_targets[family])
    seqs = run_and_check(llm, ref, [PROMPT], temperature, steps=6)
    assert len(seqs[0].token_ids) >= len(PROMPT) + 7


@pytest.mark.parametrize("family,head,temperature", [("qwen3", "vanilla", 1.0), ("qwen3", "rnn", 0.0),
                                                     ("llama", "gated", 0.7), ("llama", "dflash", 1.0)])
def test_proposals_on_a_draft_vocabulary_match_reference(tmp_path, targets, hf_targets, family, head, temperature):
    """With draft_vocab.json (FR-Spec) the draft proposes among its 200 token ids only (shuffled, so columns and
    token ids differ): the reference masks every other logit to -inf and samples the columns in the file's order."""
    dflash = head == "dflash"
    draft = make_draft(tmp_path / "draft", targets[family], rank=0 if dflash else 8, confidence=not dflash,
                       head_type="vanilla" if dflash else head, block_size=4, seed=5)
    ids = torch.randperm(320, generator=torch.Generator().manual_seed(1))[:200].tolist()
    (draft / "draft_vocab.json").write_text(json.dumps({"token_ids": ids}))
    llm = spec_llm(targets[family], draft, "dflash" if dflash else "dspark")
    ref = Reference(draft, hf_targets[family])
    seqs = run_and_check(llm, ref, [PROMPT, PROMPT[:5]], temperature, steps=6)
    drafted = [t for s in seqs for t in s.proposal.tokens]
    assert set(drafted) <= set(ids) and max(drafted) >= 200  # token ids, not column indices
    assert llm.model_runner.drafter.draft.vocab_head.weight.shape[0] == 200


def test_context_grows_by_accepted_rows(tmp_path, targets, hf_targets):
    """With accepted drafts the draft context is extended by several verify rows at once: still the reference."""
    draft = make_draft(tmp_path / "draft", targets["qwen3"], head_type="rnn", block_size=4, seed=3)
    llm = spec_llm(targets["qwen3"], draft)
    ref = Reference(draft, hf_targets["qwen3"])
    # random draft and target: enough T=1 rounds (seeded) that some round accepts several drafts
    seqs = run_and_check(llm, ref, [PROMPT, PROMPT[:5]], 1.0, steps=12)
    assert max(len(s.spec_stats.accepted_per_pos) for s in seqs) >= 2, "no round accepted 2+ drafts"


def test_batched_chunked_prefill_embedding_feature_and_short_gamma(tmp_path, targets, hf_targets):
    """Two requests of different lengths drafted in one batch (padded context slots), a prefill split into chunks
    (context written chunk by chunk), target layer -1 (the embeddings) as a feature, and gamma < block_size."""
    draft = make_draft(tmp_path / "draft", targets["llama"], head_type="gated", block_size=5, layer_ids=(-1, 1),
                       seed=5)
    llm = spec_llm(targets["llama"], draft, num_draft_tokens=3, max_num_batched_tokens=6)
    ref = Reference(draft, hf_targets["llama"])
    long_prompt = PROMPT + [7, 8, 9, 10, 11, 300, 301]
    run_and_check(llm, ref, [long_prompt, PROMPT[:4]], 1.0, steps=4)


def test_sts_temperatures_scale_confidence(tmp_path, targets, hf_targets):
    draft = make_draft(tmp_path / "draft", targets["qwen3"], block_size=4, seed=7)
    temps = [0.5, 2.0, 1.5, 3.0]
    (draft / "sts.json").write_text(json.dumps({"temperatures": temps}))
    llm = spec_llm(targets["qwen3"], draft)
    ref = Reference(draft, hf_targets["qwen3"])
    run_and_check(llm, ref, [PROMPT], 1.0, steps=2, temperatures=temps)
    # the temperatures really act: the uncalibrated confidence differs
    seq = next(iter(llm.sequences.values()))
    hidden = ref.block_hidden(seq.token_ids[:-1], seq.token_ids[-1])
    prevs = [seq.token_ids[-1]] + seq.proposal.tokens[:-1]
    assert not torch.allclose(seq.proposal.confidence, ref.confidence(hidden, prevs), atol=1e-3)


@pytest.mark.parametrize("temps", [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0], "x"])
def test_bad_sts_file_refused(tmp_path, targets, temps):
    draft = make_draft(tmp_path / "draft", targets["qwen3"], block_size=4)
    (draft / "sts.json").write_text(json.dumps({"temperatures": temps}))
    with pytest.raises(ValueError, match="sts.json"):
        spec_llm(targets["qwen3"], draft)


def test_sharded_index_layout(tmp_path, targets, hf_targets):
    single = make_draft(tmp_path / "single", targets["qwen3"], head_type="gated", block_size=4, seed=9)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(single / "config.json", sharded / "config.json")
    tensors = load_file(str(single / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    llm = spec_llm(targets["qwen3"], sharded)
    run_and_check(llm, Reference(single, hf_targets["qwen3"]), [PROMPT], 1.0, steps=2)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_target_copies_verified_and_dropped(tmp_path, targets, family):
    draft = make_draft(tmp_path / "draft", targets[family], block_size=4)
    llm = spec_llm(targets[family], draft)
    d = llm.model_runner.drafter.draft
    assert not any(n.startswith(("embed_tokens", "lm_head")) for n in d.state_dict())
    assert d.target[0] is llm.model_runner.model.embed_tokens and d.target[1] is llm.model_runner.model.lm_head
    # bf16 copies (released checkpoints are bf16) of an fp32 target are the same weights
    t = load_file(str(draft / "model.safetensors"))
    save_file({k: (v.bfloat16() if k in ("embed_tokens.weight", "lm_head.weight") else v) for k, v in t.items()},
              str(draft / "model.safetensors"))
    spec_llm(targets[family], draft)
    # and no copies at all is fine too
    spec_llm(targets[family], make_draft(tmp_path / "bare", targets[family], with_target_copies=False))


@pytest.mark.parametrize("name", ["embed_tokens.weight", "lm_head.weight"])
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_differing_target_copy_refused(tmp_path, targets, family, name):
    draft = make_draft(tmp_path / "draft", targets[family], block_size=4)
    t = load_file(str(draft / "model.safetensors"))
    t[name] = t[name].clone()
    t[name][7, 3] += 0.01
    save_file(t, str(draft / "model.safetensors"))
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*differs"):
        spec_llm(targets[family], draft)


@pytest.mark.parametrize("overrides,layer_ids,message", [
    ({"hidden_size": 32}, (0, 1), "hidden_size 32 != the target's 64"),
    ({"vocab_size": 300}, (0, 1), "vocab_size 300 != the target's 320"),
    ({}, (0, 3), "target layer id 3 is out of range"),
    ({}, (-2, 1), "target layer id -2 is out of range"),
    ({}, (0, 2), "target layer 2 is the target's last layer"),
    ({"num_target_layers": 4}, (0, 1), "num_target_layers 4 != the target's 3 layers"),
    ({"mask_token_id": 320}, (0, 1), "mask_token_id 320 is outside the vocabulary"),
])
def test_mismatched_draft_refused(tmp_path, targets, overrides, layer_ids, message):
    draft = save_tiny_draft(tmp_path / "draft", targets["qwen3"], layer_ids=layer_ids, with_target_copies=False,
                            **overrides)
    with pytest.raises(ValueError, match=message):
        spec_llm(targets["qwen3"], draft)



def test_fused_cpu_backbone_equals_the_layer_by_layer_block(tmp_path, targets, monkeypatch):
    """bf16 on CPU the draft's block runs through the target's C++ decoder stack: the block's K/V go to scratch slots
    and every row sees its context plus the whole block. Its hidden states equal the Python layers' (the path the
    reference tests above check) up to bf16 rounding order; a causal variant (each row seeing the block only up to
    itself) is far outside that bound."""
    draft_dir = make_draft(tmp_path / "draft", targets["qwen3"], rank=8, block_size=4, seed=3)
    llm = spec_llm(targets["qwen3"], draft_dir, dtype="bfloat16")
    draft = llm.model_runner.drafter.draft
    calls = []
    backbone = draft.backbone
    monkeypatch.setattr(draft, "backbone", lambda *args: calls.append(args) or backbone(*args))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.generate([PROMPT, PROMPT[:4], PROMPT[2:9]], params, use_tqdm=False)
    assert len(calls) > 4 and draft.stack[1] is not None
    for args in calls[-3:]:
        with torch.inference_mode():
            fused = backbone(*args).float()
            with monkeypatch.context() as m:
                m.setattr(draft, "fused_stack", lambda x: None)
                layers = backbone(*args).float()
            with monkeypatch.context() as m:
                m.setattr(draft, "block_row_limits",
                          lambda ctx, G: (ctx[:, None] + 1 + torch.arange(G)).reshape(-1))
                causal = backbone(*args).float()
        bound = 2 * 2.0 ** -8 * layers.abs().max().item()  # two bf16 ulps at the largest magnitude
        assert (fused - layers).abs().max().item() <= bound
        assert (causal - layers).abs().max().item() > 10 * bound
