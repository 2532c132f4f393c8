"""`make gpu-check` runs this on CUDA (bench/gpu_check.KERNEL_TESTS): the tiny V4 + DSpark engine path, with the
Triton kernels eager and in CUDA graphs (the target's fixed-shape steps and the module's draft step), gives the CPU
path's greedy tokens, plain and speculative; and so does a checkpoint stored as the release stores it, its FP8 /
MXFP4 weights kept on the GPU (quantization 'fp8'), eager and in graphs. On a machine without a GPU it is skipped:
the CPU path is covered by tests/test_v4_*.py and tests/test_triton_stored_moe.py."""
import pytest
import torch
from tiny_models import save_tiny_v4_dspark

from engine import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the V4 engine path on CUDA needs a GPU")
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4cuda") / "tiny-v4-dspark"
    save_tiny_v4_dspark(path, seed=3, vocab_size=8, block_size=4)
    return path


def tokens(path, **options) -> list[list[int]]:
    return [o.token_ids for o in generate(path, **options)[0]]


def generate(path, **options):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 8, (n,), generator=g).tolist() for n in (13, 3, 21, 9)]
    llm = LLM(model=str(path), dtype="float32", kv_cache_gb=0.05, kv_block_size=8, **options)
    return llm.generate(prompts, GREEDY, use_tqdm=False), llm


@pytest.mark.parametrize("spec_method", ["none", "dspark"])
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_cuda_tokens_equal_cpu_tokens(path, spec_method, enforce_eager):
    expected = tokens(path, device="cpu", spec_method=spec_method)
    outs, llm = generate(path, device="cuda", kernels="triton", spec_method=spec_method, enforce_eager=enforce_eager)
    assert [o.token_ids for o in outs] == expected
    captured = llm.model_runner.graphs is not None
    assert captured == (not enforce_eager)
    if captured and spec_method == "dspark":
        assert llm.speculator.drafter.graphs is not None


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The checkpoint stored as the release stores it (FP8 block linears, MXFP4 experts): tests/test_v4_stored.py."""
    from test_v4_stored import quantized_checkpoint
    return quantized_checkpoint(tmp_path_factory, "fp4")


@pytest.mark.parametrize("spec_method", ["none", "dspark"])
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])
def test_weights_kept_as_stored_on_cuda_give_the_cpu_tokens(quantized, spec_method, enforce_eager):
    """quantization 'fp8' (the default on CUDA for this checkpoint): the FP8 / MXFP4 bytes on the GPU, the linears'
    dequantized per matmul, the experts' decoded inside the stored-MoE kernel; the same tokens as the CPU path, which
    dequantizes at load, eager and in CUDA graphs."""
    expected = tokens(quantized, device="cpu", spec_method=spec_method, quantization="none")
    outs, llm = generate(quantized, device="cuda", kernels="triton", spec_method=spec_method, quantization="fp8",
                         enforce_eager=enforce_eager)
    assert [o.token_ids for o in outs] == expected
    assert {layer.ffn.path for layer in llm.model_runner.model.layers} == {"stored"}
    assert (llm.model_runner.graphs is not None) == (not enforce_eager)
