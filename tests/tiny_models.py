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
