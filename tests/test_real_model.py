"""Our engine on the embedded default model (SmolLM2-135M-Instruct) against goldens and transformers, fp32."""
import math

import pytest
import torch
from test_default_model import GOLDEN_IDS, MODEL_DIR, PARAGRAPH, converted  # noqa: F401

from engine import LLM, SamplingParams

PROMPTS = ["Write a haiku about the sea.", "List three prime numbers and explain why they are prime.",
           "def fibonacci(n):"]


@pytest.fixture(scope="module")
def llm(converted):  # noqa: F811
    return LLM(model=str(MODEL_DIR), dtype="float32", kv_cache_gb=0.25)


def test_golden_chat_answer(llm):
    [out] = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    assert out.token_ids == GOLDEN_IDS
    assert out.text == "The capital of France is Paris." and out.finish_reason == "stop"


def test_greedy_equals_transformers_generate(llm, converted):  # noqa: F811
    tokenizer, model = converted
    prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS[:2]] + [llm.tokenize(PROMPTS[2])]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ids = torch.tensor([prompt])  # explicit mask: generate would mask <|im_end|> (= pad id) in the prompt
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                 eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert out.token_ids == ref


def test_perplexity_is_sane(llm):
    ids = llm.tokenize(PARAGRAPH)
    llm.add_request(ids, SamplingParams(max_tokens=1), request_id="ppl")
    [seq] = llm.scheduler.schedule()
    [logits], _ = llm.model_runner.forward([seq], [len(ids)])
    llm.abort("ppl")
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    assert math.exp(nll.item()) < 30
