"""Writing a trained DSpark module back into a quantized DeepSeek-V4 checkpoint: a tiny V4 + DSpark checkpoint stored
as the release stores it (FP8 block-scaled linears with e8m0 or float32 scales, MXFP4 routed experts, three shards
that put a weight and its scale in different files; tests/test_v4_checkpoint.py's quantizer, written from the format's
definition), its module's weights moved, written back with train.v4_module.write_back. Checked against that test's
independent oracle: every stage tensor read back is the trained one within half a quantization step of its new scale,
quantizing what was read back gives the same values again, and the engine loads and serves the copy."""
import json

import pytest
import torch
from safetensors import safe_open
from test_v4_checkpoint import error_bound, oracle, quantize, write_checkpoint
from tiny_models import save_tiny_v4_dspark

from engine import LLM, SamplingParams
from engine.models.deepseek_v4.checkpoint import weight_map
from train.v4_module import write_back


@pytest.fixture(scope="module", params=["fp4", "fp8"])
def quantized(request, tmp_path_factory):
    """A V4-Flash-like (fp4 experts, e8m0 scales) or Flash-Base-like (fp8 experts, float32 scales) tiny checkpoint."""
    from safetensors.torch import load_file
    plain = tmp_path_factory.mktemp("plain") / "tiny-v4-dspark"
    save_tiny_v4_dspark(plain, seed=2)
    path = write_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt",
                            quantize(load_file(str(plain / "model.safetensors")), request.param))
    for file in plain.iterdir():
        if not file.name.startswith("model.safetensors"):
            (path / file.name).write_bytes(file.read_bytes())
    return path


def read_all(path) -> dict[str, torch.Tensor]:
    out = {}
    for name, file in weight_map(path).items():
        with safe_open(str(file), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def moved_module(path):
    """The checkpoint's module as the engine loads it, every weight moved by noise of its own size."""
    llm = LLM(model=str(path), dtype="float32", spec_method="dspark", kv_cache_gb=0.02, kv_block_size=8)
    draft = llm.speculator.drafter.draft
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in draft.state_dict().values():
            if t.is_floating_point():
                t += 0.5 * t.abs().mean() * torch.randn(t.shape, generator=g)
    return draft, {n: t.clone() for n, t in draft.state_dict().items()}


def worst_excess(stored: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> float:
    """Largest |read back - trained| beyond the format's half step, over the quantized stage weights (<= 0: none)."""
    worst = float("-inf")
    for name, t in trained.items():
        if stored[name].dtype in (torch.float8_e4m3fn, torch.int8, torch.uint8):
            gap = (oracle(stored, name, torch.float64) - t.double()).abs()
            worst = max(worst, float((gap - error_bound(name, t, stored)).max()))
    return worst


def test_quantized_stage_weights_are_written_back(quantized, tmp_path):
    draft, trained = moved_module(quantized)
    out = write_back(draft, quantized, tmp_path / "out")
    before, after = read_all(quantized), read_all(out)
    assert set(after) == set(before) and all(after[n].dtype == before[n].dtype for n in before)
    assert any(after[n].dtype == torch.float8_e4m3fn for n in trained)
    assert worst_excess(after, trained) <= 0
    assert worst_excess(before, trained) > 0  # negative control: the weights before training are far off
    for name, t in trained.items():
        if not after[name].dtype.is_floating_point or after[name].dtype == torch.float8_e4m3fn:
            continue
        assert torch.equal(after[name], t.to(after[name].dtype))  # floats are stored as they are
    assert all(torch.equal(after[n], before[n]) for n in before if not n.startswith("mtp."))
    assert json.loads((out / "config.json").read_text()) == json.loads((quantized / "config.json").read_text())


def test_writing_back_again_loses_nothing(quantized, tmp_path):
    """Quantizing the dequantized written weights again gives the same values (the bytes may differ: a block whose
    largest value rounded down to half its scale's range can take the next smaller scale): the quantizer and the
    loader's dequantizer agree."""
    draft, _ = moved_module(quantized)
    first = write_back(draft, quantized, tmp_path / "first")
    reloaded, _ = moved_module(first)
    with torch.no_grad():  # undo the noise: the weights exactly as read from `first`
        loaded = LLM(model=str(first), dtype="float32", spec_method="dspark", kv_cache_gb=0.02,
                     kv_block_size=8).speculator.drafter.draft.state_dict()
        for name, t in reloaded.state_dict().items():
            t.copy_(loaded[name])
    second = write_back(reloaded, first, tmp_path / "second")
    a, b = read_all(first), read_all(second)
    weights = [n for n in a if not n.endswith(".scale")]
    assert all(torch.equal(oracle(a, n, torch.float64), oracle(b, n, torch.float64)) for n in weights)


def test_the_engine_serves_the_written_copy(quantized, tmp_path):
    draft, _ = moved_module(quantized)
    out = write_back(draft, quantized, tmp_path / "out")
    prompt = [[5, 17, 33, 250, 7, 9, 8, 100, 41, 12]]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = LLM(model=str(out), dtype="float32", spec_method="none").generate(prompt, greedy, use_tqdm=False)
    spec = LLM(model=str(out), dtype="float32", spec_method="dspark").generate(prompt, greedy, use_tqdm=False)
    assert spec[0].token_ids == plain[0].token_ids
