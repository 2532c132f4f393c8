"""DeepSeek-V4's FP8 / MXFP4 weights kept as stored (`quantization='fp8'`, the default on CUDA): a tiny V4 + DSpark
checkpoint quantized as the release stores it (tests/test_v4_checkpoint.py's quantizer, three shards) serves the same
tokens as the same checkpoint dequantized at load, every kept weight makes exactly the loader's dense weight, and it
holds the stored bytes, not a dense copy; tensor-parallel cuts of a stored weight are the cuts of its dense weight,
and a cut inside a scale block is refused by name."""
import json

import pytest
import torch
from test_v4_checkpoint import quantize, quantize_fp8_block, quantize_mxfp4, write_checkpoint
from tiny_models import save_tiny_v4_dspark

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.models.deepseek_v4.checkpoint import E2M1_VALUES, StoredTensor, dequant_fp8_block, dequant_mxfp4
from engine.models.deepseek_v4.stored import StoredWeight
from engine.models.layers import Linear
from engine.parallel import columns, rows

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def quantized_checkpoint(tmp_path_factory, experts: str):
    """A tiny V4 + DSpark checkpoint (8-token vocabulary) with fp4 (V4-Flash) or fp8 (Flash-Base) experts."""
    from safetensors.torch import load_file
    plain = tmp_path_factory.mktemp("plain") / "tiny-v4-dspark"
    save_tiny_v4_dspark(plain, seed=4, vocab_size=8)
    path = write_checkpoint(tmp_path_factory.mktemp(experts) / "ckpt",
                            quantize(load_file(str(plain / "model.safetensors")), experts))
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                     "weight_block_size": [128, 128], "expert_dtype": experts}
    (path / "config.json").write_text(json.dumps(config))
    for file in plain.iterdir():
        if not file.name.startswith(("model.safetensors", "config.json")):
            (path / file.name).write_bytes(file.read_bytes())
    return path


@pytest.fixture(scope="module", params=["fp4", "fp8"])
def quantized(request, tmp_path_factory):
    return quantized_checkpoint(tmp_path_factory, request.param)


def llm(path, quantization: str, **options) -> LLM:
    return LLM(model=str(path), dtype="float32", quantization=quantization, kv_cache_gb=0.02, kv_block_size=8,
               **options)


def linears(module) -> dict[str, Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, Linear)}


def test_kept_weights_are_the_loaders_dense_weights(quantized):
    kept, dense = llm(quantized, "fp8", spec_method="dspark"), llm(quantized, "none", spec_method="dspark")
    for a, b in ((kept.model_runner.model, dense.model_runner.model),
                 (kept.speculator.drafter.draft, dense.speculator.drafter.draft)):
        stored, plain = linears(a), linears(b)
        assert any(m.kept is not None for m in stored.values())
        for name, module in stored.items():
            if module.kept is not None:
                assert torch.equal(module.stored(torch.float32), plain[name].weight), name
                assert module.stored.data.element_size() == 1  # the stored bytes, no dense copy
            else:
                assert torch.equal(module.weight, plain[name].weight), name


def test_it_holds_fewer_bytes(quantized):
    def nbytes(module):
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    kept, dense = llm(quantized, "fp8").model_runner.model, llm(quantized, "none").model_runner.model
    stored = [m.stored for m in linears(kept).values() if m.kept is not None]
    saved = sum(s.shape[0] * s.shape[1] * 4 - s.data.numel() - s.scale.numel() * s.scale.element_size()
                - 4 * len(E2M1_VALUES) * (s.kind == "fp4") for s in stored)  # fp32 dense weights here
    assert nbytes(dense) - nbytes(kept) == saved > 0


def test_same_tokens_plain_and_speculative(quantized):
    prompts = [[1, 5, 2, 7, 3, 3, 6, 1, 4, 2, 5, 7, 1], [4, 4, 2]]
    expected = [o.token_ids for o in llm(quantized, "none", spec_method="none").generate(prompts, GREEDY,
                                                                                          use_tqdm=False)]
    for method in ("none", "dspark"):
        outs = llm(quantized, "fp8", spec_method=method).generate(prompts, GREEDY, use_tqdm=False)
        assert [o.token_ids for o in outs] == expected


def test_auto_keeps_fp8_on_cuda_only(quantized, tmp_path):
    assert EngineConfig(model=str(quantized), device="cpu", spec_method="none").quantization == "none"
    plain = tmp_path / "plain"
    save_tiny_v4_dspark(plain, seed=0, vocab_size=8)
    with pytest.raises(ValueError, match="no fp8 quantization_config"):
        EngineConfig(model=str(plain), device="cpu", quantization="fp8", spec_method="none")


@pytest.mark.parametrize("kind", ["fp8", "fp4"])
def test_tensor_parallel_cuts_along_whole_blocks(kind):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(384, 512, generator=g)
    data, scale = quantize_fp8_block(w, e8m0=True) if kind == "fp8" else quantize_mxfp4(w)
    dense = dequant_fp8_block(data, scale) if kind == "fp8" else dequant_mxfp4(data, scale)
    full = StoredTensor("w", kind, data, scale)
    for shard in (rows((128, 256)), columns((256, 128), (0, 128)), rows((0, 128), (256, 128))):
        part = StoredWeight(shard.take(full))(torch.float32)
        assert torch.equal(part, shard.take(dense))
    start = 64 if kind == "fp8" else 48
    with pytest.raises(ValueError, match=f"w: tensor parallelism cuts its dim 1 at {start}..{start + 128}, inside"):
        columns((start, 128)).take(full)
