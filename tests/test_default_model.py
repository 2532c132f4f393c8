"""The converted default model (python -m engine.default_model) against golden outputs, with transformers in fp32."""
import numpy as np
import pytest
import torch

from engine.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR
from engine.default_model import hf_name, is_complete, unpermute

MODEL_DIR = DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME
GOLDEN_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris." + <|im_end|>
PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It began as a small settlement on the banks "
    "of a river, where traders stopped to rest and exchange goods. Over the centuries it grew into an important "
    "market town, and later into a busy port. Today it is known for its old churches, its narrow streets and its "
    "lively cultural life, which attracts visitors from all over the world."
)


def llama_cpp_permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(3 * 64 * 5, dtype=np.float32).reshape(3 * 64, 5)
    assert np.array_equal(unpermute(llama_cpp_permute(w, 3), 3), w)


def test_tensor_names():
    assert hf_name("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def converted():
    if not is_complete(MODEL_DIR):
        pytest.skip(f"{MODEL_DIR} absent: run `python -m engine.default_model`")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(MODEL_DIR), model


def test_tokenizer(converted):
    tok, _ = converted
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert "<|im_start|>assistant\n" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                add_generation_prompt=True, tokenize=False)
    assert len(tok("2024")["input_ids"]) == 4  # llama.cpp's "smollm" pre-tokenizer: one token per digit


def test_golden_greedy(converted):
    tok, model = converted
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(ids["input_ids"], max_new_tokens=16, do_sample=False)
    assert out[0, ids["input_ids"].shape[1]:].tolist() == GOLDEN_IDS


def test_perplexity(converted):
    tok, model = converted
    ids = tok(PARAGRAPH, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        perplexity = model(ids, labels=ids).loss.exp().item()
    assert perplexity < 30, f"perplexity {perplexity:.1f}: Q/K permutation wrong?"  # measured 7.8; permuted ~63
