"""A freshly initialised DSpark / DFlash draft for a target, written in DeepSpec's checkpoint format (without copies
of the target's embedding and LM head): the starting point of training, and a stand-in for cost measurements."""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_MASK_TOKEN = {"LlamaForCausalLM": 16}  # SmolLM2: <empty_output>, a StarCoder special chat never produces


def default_layer_ids(num_target_layers: int, count: int = 5) -> list[int]:
    """Spread over the target like DeepSpec's [1, 9, 17, 25, 33] for 36 layers; never the last layer."""
    last = num_target_layers - 2
    return sorted({1 + round(i * (last - 1) / (count - 1)) for i in range(count)})


def draft_config(target: dict, num_layers: int, block_size: int, rank: int, head_type: str,
                 layer_ids: list[int], mask_token_id: int, confidence: bool) -> dict:
    c = dict(target, architectures=["Qwen3DSparkModel"], model_type="qwen3",
             num_target_layers=target["num_hidden_layers"], num_hidden_layers=num_layers, block_size=block_size,
             tie_word_embeddings=False, layer_types=["full_attention"] * num_layers, mask_token_id=mask_token_id,
             target_layer_ids=layer_ids, num_anchors=512, enable_confidence_head=confidence, markov_rank=rank,
             attention_bias=False)
    c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
    if confidence:
        c["confidence_head_with_markov"] = rank > 0
    if rank:
        c["markov_head_type"] = head_type
    return c


def init_tensors(c: dict, std: float = 0.02, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, V, inter, r = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["markov_rank"]
    hd = c["head_dim"]
    nq, nkv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd

    def normal(*shape):
        return torch.randn(*shape, generator=g) * std
    t = {"fc.weight": normal(h, len(c["target_layer_ids"]) * h), "hidden_norm.weight": torch.ones(h),
         "norm.weight": torch.ones(h)}
    for i in range(c["num_hidden_layers"]):
        p = f"layers.{i}."
        t |= {p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
              p + "self_attn.q_proj.weight": normal(nq, h), p + "self_attn.k_proj.weight": normal(nkv, h),
              p + "self_attn.v_proj.weight": normal(nkv, h), p + "self_attn.o_proj.weight": normal(h, nq),
              p + "self_attn.q_norm.weight": torch.ones(hd), p + "self_attn.k_norm.weight": torch.ones(hd),
              p + "mlp.gate_proj.weight": normal(inter, h), p + "mlp.up_proj.weight": normal(inter, h),
              p + "mlp.down_proj.weight": normal(h, inter)}
    if r:
        t |= {"markov_head.markov_w1.weight": normal(V, r), "markov_head.markov_w2.weight": torch.zeros(V, r)}
        if c.get("markov_head_type") == "gated":
            t |= {"markov_head.gate_proj.weight": normal(r, h + r), "markov_head.gate_proj.bias": torch.zeros(r)}
        if c.get("markov_head_type") == "rnn":
            t |= {"markov_head.joint_proj.weight": normal(3 * r, 2 * r + h),
                  "markov_head.joint_proj.bias": torch.zeros(3 * r)}
    if c["enable_confidence_head"]:
        t |= {"confidence_head.proj.weight": normal(1, h + (r if c.get("confidence_head_with_markov") else 0)),
              "confidence_head.proj.bias": torch.zeros(1)}
    return t


def init_draft(target_dir: str | Path, out_dir: str | Path, num_layers: int = 2, block_size: int = 7,
               rank: int = 64, head_type: str = "vanilla", layer_ids: list[int] | None = None,
               mask_token_id: int | None = None, confidence: bool = True, dtype: str = "bfloat16",
               seed: int = 0) -> Path:
    target = json.loads((Path(target_dir) / "config.json").read_text())
    if mask_token_id is None:
        mask_token_id = DEFAULT_MASK_TOKEN.get(target["architectures"][0], target["vocab_size"] - 1)
    c = draft_config(target, num_layers, block_size, rank, head_type,
                     layer_ids or default_layer_ids(target["num_hidden_layers"]), mask_token_id,
                     confidence and rank > 0)
    c["dtype"] = dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in init_tensors(c, seed=seed).items()}
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    return out
