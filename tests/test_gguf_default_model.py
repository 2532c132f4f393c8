"""The embedded default model served from its own Q4_1 GGUF (Q4_1 linears, a Q8_0 embedding / tied LM head).

The reference is our dense fp32 path over the same weights dequantized by the `gguf` library (the model directory's
model.safetensors, which engine.default_model converts from the same file): with fp32 activations the two differ
only in fp32 summation order, so greedy outputs must agree token for token."""
import pytest

from engine import LLM, SamplingParams
from engine.config import DEFAULT_DRAFT, DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR
from engine.default_model import GGUF_MEMBER, is_complete
from engine.models.quant import QuantEmbedding, QuantLinear
from kernels import quant_linear

MODEL_DIR = DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME
GOLDEN_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris." + <|im_end|>
PROMPTS = ["Write a haiku about the sea.", "List three prime numbers and explain why they are prime.",
           "Explain what a hash map is to a child."]

pytestmark = [
    pytest.mark.skipif(not quant_linear.available(), reason="CPU kernels unavailable here"),
    pytest.mark.skipif(not (is_complete(MODEL_DIR) and (MODEL_DIR / GGUF_MEMBER.split("/")[-1]).is_file()),
                       reason=f"{MODEL_DIR} (with its GGUF) absent: run `python -m engine.default_model`"),
]


def chat_prompts(llm: LLM) -> list[list[int]]:
    return [llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS] + [llm.tokenize("def fibonacci(n):")]


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = 24) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    return [out.token_ids for out in outs]


@pytest.fixture(scope="module")
def quantized_fp32():
    return LLM(model=str(MODEL_DIR), dtype="float32", spec_method="none", kv_cache_gb=0.1)


@pytest.fixture(scope="module")
def default():
    return LLM(spec_method="none", kv_cache_gb=0.1, enable_prefix_caching=False)


def test_served_in_its_own_block_types_by_default(quantized_fp32, default):
    assert default.config.quantization == "gguf" and default.config.dtype == "bfloat16"
    model = quantized_fp32.model_runner.model
    assert isinstance(model.embed_tokens, QuantEmbedding) and model.embed_tokens.qtype == quant_linear.Q8_0
    assert model.lm_head.blocks.data_ptr() == model.embed_tokens.blocks.data_ptr()  # tied: one copy of the blocks
    assert {m.qtype for m in model.layers.modules() if isinstance(m, QuantLinear)} == {quant_linear.Q4_1}
    [out] = default.chat([{"role": "user", "content": "What is the capital of France?"}],
                         SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert out.token_ids == GOLDEN_IDS  # bf16 activations over the Q4_1 blocks


def test_greedy_equals_fp32_over_gguf_dequantization(quantized_fp32):
    dense = LLM(model=str(MODEL_DIR), dtype="float32", quantization="none", spec_method="none", kv_cache_gb=0.1)
    assert not any(isinstance(m, QuantLinear) for m in dense.model_runner.model.modules())
    prompts = chat_prompts(dense)
    assert greedy(quantized_fp32, prompts) == greedy(dense, prompts)


def test_speculative_greedy_equals_plain_greedy(default):
    """The default Q4_1 target and DSpark draft, every drafted token verified (the SPS planner's start-up profile
    would take most of this test's time and only changes how many are). One prompt at a time: a batch's prefill of
    over 64 rows takes dequantize + GEMM, whose bf16-rounded sums differ from the kernel's, so a batch can differ
    from its prompts alone (as the dense bf16 path past its kernel's rows), and so can a prompt whose prefix K/V
    was cached by another's prefill (no prefix caching here); decode and verify rows are batch-invariant."""
    spec = LLM(kv_cache_gb=0.1, verify_policy="full", enable_prefix_caching=False)
    assert spec.config.quantization == "gguf" and spec.config.draft == str(DEFAULT_DRAFT)
    for prompt in chat_prompts(default)[:2]:
        assert greedy(spec, [prompt], 24) == greedy(default, [prompt], 24)


def test_a_gguf_file_becomes_a_model_directory(tmp_path):
    """--model FILE.gguf: config, tokenizer and chat template converted from the file equal the default model's
    (converted from the same file by engine.default_model), and the weights are the file's."""
    from engine.gguf_files import model_dir_for
    gguf = MODEL_DIR / GGUF_MEMBER.split("/")[-1]
    made = model_dir_for(gguf, tmp_path)
    assert model_dir_for(gguf, tmp_path) == made  # cached
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        assert (made / name).read_text() == (MODEL_DIR / name).read_text(), name
    assert (made / gguf.name).resolve() == gguf.resolve()
    llm = LLM(model=str(made), spec_method="none", kv_cache_gb=0.1)
    assert llm.config.quantization == "gguf"
    [out] = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert out.token_ids == GOLDEN_IDS
