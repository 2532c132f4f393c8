"""Tiny random HF models (transformers' own classes) saved to disk, used as exact references."""
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

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
