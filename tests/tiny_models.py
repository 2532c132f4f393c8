"""Tiny random HF models (transformers' own classes) saved to disk, used as exact references."""
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
          "héllo wörld 你好 🎉 numbers 0123456789", "def add(a, b):\n    return a + b\n"] * 4


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def tiny_config(family: str, vocab_size: int, **overrides):
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, eos_token_id=0, bos_token_id=None, pad_token_id=1)
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**{"tie_word_embeddings": True, "rope_theta": 10000.0, **common})
    if family == "qwen2":
        return Qwen2Config(**{"tie_word_embeddings": False, **common})
    return Qwen3Config(**{"head_dim": 32, "tie_word_embeddings": False, **common})


def save_tiny_model(path: Path, family: str, seed: int = 0, **overrides) -> Path:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), **overrides), dtype=torch.float32)
    with torch.no_grad():  # random init is small; widen it so logits are not near-uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def deepspec_draft_tensors(cfg: dict, num_layers: int, n_features: int, rank: int, head_type: str,
                           confidence: bool, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights under DeepSpec's exact Qwen3DSparkModel state-dict names and shapes."""
    h, V, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def rnd(*shape, std=0.15):
        return torch.randn(*shape, generator=generator) * std

    def norm(n):
        return 1 + rnd(n, std=0.1)
    t = {"fc.weight": rnd(h, n_features * h, std=0.1), "hidden_norm.weight": norm(h), "norm.weight": norm(h)}
    for i in range(num_layers):
        p = f"layers.{i}."
        t |= {p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h),
              p + "self_attn.q_proj.weight": rnd(nq, h), p + "self_attn.k_proj.weight": rnd(nkv, h),
              p + "self_attn.v_proj.weight": rnd(nkv, h), p + "self_attn.o_proj.weight": rnd(h, nq),
              p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd),
              p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
              p + "mlp.down_proj.weight": rnd(h, inter)}
    if rank:
        t |= {"markov_head.markov_w1.weight": rnd(V, rank, std=1.0), "markov_head.markov_w2.weight": rnd(V, rank)}
        if head_type == "gated":
            t |= {"markov_head.gate_proj.weight": rnd(rank, h + rank), "markov_head.gate_proj.bias": rnd(rank)}
        if head_type == "rnn":
            t |= {"markov_head.joint_proj.weight": rnd(3 * rank, 2 * rank + h),
                  "markov_head.joint_proj.bias": rnd(3 * rank)}
    if confidence:
        t |= {"confidence_head.proj.weight": rnd(1, h + rank), "confidence_head.proj.bias": rnd(1)}
    return t


def save_tiny_draft(path: Path, target_dir: Path, *, rank: int = 8, head_type: str = "vanilla",
                    block_size: int = 4, num_layers: int = 2, layer_ids=(0, 1), confidence: bool = True,
                    mask_token_id: int = 5, with_target_copies: bool = True, seed: int = 0, **overrides) -> Path:
    """A DSpark (rank > 0) or DFlash (rank 0) draft for the tiny target in DeepSpec's checkpoint layout."""
    import json

    from safetensors.torch import load_file, save_file
    target_cfg = json.loads((target_dir / "config.json").read_text())
    cfg = dict(target_cfg, architectures=["Qwen3DSparkModel"], model_type="qwen3",
               num_target_layers=target_cfg["num_hidden_layers"], num_hidden_layers=num_layers,
               block_size=block_size, tie_word_embeddings=False, layer_types=["full_attention"] * num_layers,
               mask_token_id=mask_token_id, target_layer_ids=list(layer_ids), num_anchors=512,
               enable_confidence_head=confidence, markov_rank=rank)
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    if confidence:
        cfg["confidence_head_with_markov"] = rank > 0
    if rank:
        cfg["markov_head_type"] = head_type
    cfg.update(overrides)
    tensors = deepspec_draft_tensors(cfg, num_layers, len(layer_ids), rank, head_type, confidence,
                                     torch.Generator().manual_seed(seed))
    if with_target_copies:
        target = load_file(str(target_dir / "model.safetensors"))
        embed = target["model.embed_tokens.weight"]
        tensors |= {"embed_tokens.weight": embed, "lm_head.weight": target.get("lm_head.weight", embed).clone()}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


V4_KINDS = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
            "compressed_sparse_attention"]
V4_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}


def tiny_v4(seed: int = 0, **overrides) -> DeepseekV4ForCausalLM:
    """A random DeepSeek-V4 (transformers' own class, fp32) with every attention kind, a hash layer, 8 experts (top 2),
    windows of 4 and 8 tokens and an 8-token sliding window; its sinks, biases, ape and hash table far from their
    zero init, so each one matters. Eight indexer heads make exact ties in the indexer's scores rare."""
    options = dict(vocab_size=320, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
                   num_attention_heads=4, head_dim=32, q_lora_rank=32, n_routed_experts=8, num_experts_per_tok=2,
                   o_groups=2, o_lora_rank=16, index_n_heads=8, index_head_dim=16, index_topk=3, sliding_window=8,
                   layer_types=V4_KINDS, mlp_layer_types=["hash_moe"] + ["moe"] * 3, partial_rotary_factor=0.25,
                   compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                   initializer_range=0.1, rope_parameters=V4_YARN, max_position_embeddings=512, eos_token_id=0)
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**(options | overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("position_bias", "sinks", "base", "e_score")):
                p.normal_(0, 0.5)
        for m in model.modules():
            if hasattr(m, "tid2eid"):
                m.tid2eid.copy_(torch.randint(0, model.config.n_routed_experts, m.tid2eid.shape))
    return model


def released_v4_config(model: DeepseekV4ForCausalLM) -> dict:
    """transformers' config in the released config.json's own keys (compress_ratios, num_hash_layers,
    qk_rope_head_dim, rope_theta / compress_rope_theta / rope_scaling)."""
    c = json.loads(model.config.to_json_string())
    kinds, rates, rope = c.pop("layer_types"), c.pop("compress_rates"), c.pop("rope_parameters")
    c["compress_ratios"] = [0 if k == "sliding_attention" else rates[k] for k in kinds]
    c["layer_types"] = kinds  # not in a release; lets transformers' AutoConfig (the tokenizer reads it) accept ratio 8
    c["num_hash_layers"] = c.pop("mlp_layer_types").count("hash_moe")
    c["qk_rope_head_dim"] = int(c["head_dim"] * c.pop("partial_rotary_factor"))
    c["rope_theta"], c["compress_rope_theta"] = rope["main"]["rope_theta"], rope["compress"]["rope_theta"]
    if rope["compress"]["rope_type"] == "yarn":
        keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
        c["rope_scaling"] = {"type": "yarn"} | {k: rope["compress"][k] for k in keys}
    return c | {"architectures": ["DeepseekV4ForCausalLM"]}


def save_tiny_v4(path: Path, seed: int = 0, **overrides) -> DeepseekV4ForCausalLM:
    """A tiny V4 checkpoint in the released layout (config keys and tensor names; fp32, unquantized) with a tokenizer;
    returns transformers' model of the same weights."""
    from safetensors.torch import save_file

    from engine.models.deepseek_v4.checkpoint import released_state_from_transformers
    model = tiny_v4(seed, **overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(released_v4_config(model), indent=2))
    state = released_state_from_transformers(model.state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    tiny_tokenizer().save_pretrained(path)
    return model


def v4_dspark_stage_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random `mtp.K.*` tensors for a config.json that declares a DSpark module, shaped by our module's own names
    (each a full V4 block; main_proj / main_norm on the first stage, hc_head, norm, Markov and confidence heads on
    the last), scaled so that every part moves the draft."""
    from engine.drafts.v4_dspark import build_draft, expected_shapes
    from engine.models.deepseek_v4.config import v4_config
    stages = len(config["compress_ratios"]) - config["num_hidden_layers"]
    names = [f"mtp.{s}.x" for s in range(stages)]
    shapes = expected_shapes(build_draft(v4_config(config), config, names, "tiny"))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if name.endswith("norm.weight"):
            t = 1 + 0.1 * t
        elif name.endswith("_scale"):
            t = 1 + 0.2 * t
        elif "markov_w1" in name or "hc_" in name or name.endswith(("attn_sink", "gate.bias")):
            t = 0.5 * t
        else:
            t = 0.1 * t
        state[name] = t
    return state


def save_tiny_v4_dspark(path: Path, seed: int = 0, stages: int = 3, block_size: int = 4, markov_rank: int = 8,
                        target_layer_ids=(1, 2, 3), **overrides) -> DeepseekV4ForCausalLM:
    """A tiny V4-Flash-DSpark-like checkpoint in the released layout: the tiny V4 target (head_dim 80 with 16 rope
    channels, so the module's fake-FP8 groups of 64 fit) plus `stages` random DSpark stages under `mtp.*` and the
    config's dspark_* keys; returns transformers' model of the target."""
    from safetensors.torch import load_file, save_file
    options = dict(head_dim=80, partial_rotary_factor=0.2) | overrides
    model = save_tiny_v4(path, seed, **options)
    config = json.loads((path / "config.json").read_text())
    config["compress_ratios"] += [0] * stages
    config |= {"dspark_block_size": block_size, "dspark_noise_token_id": config["vocab_size"] - 1,
               "dspark_target_layer_ids": list(target_layer_ids), "dspark_markov_rank": markov_rank,
               "num_nextn_predict_layers": 1}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    state = load_file(str(path / "model.safetensors")) | v4_dspark_stage_tensors(config, seed)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return model
