"""DeepSeek-V4 checkpoints in the released format: a tiny random transformers DeepseekV4ForCausalLM written under the
released names, quantized as the real checkpoint is (FP8 128x128 block scales, MXFP4 routed experts, bf16 / fp32
elsewhere), sharded with an index, must load to exactly what an independent dequantizer written here from the format's
definition gives, and within the quantization error of the original weights. The quantizers and the oracle below use
bit arithmetic only: none of them calls engine.models.deepseek_v4.checkpoint."""
import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from engine.models.deepseek_v4.checkpoint import (
    dequant_fp8_block,
    dequant_mxfp4,
    e8m0_to_float,
    load_v4_state,
    released_name,
    released_state_from_transformers,
    transformers_name,
    transformers_state_from_released,
)

# ---- how the real checkpoint stores each tensor (vLLM deepseek_v4.py, DeepSeek's inference/model.py, the shard
# headers as read by public loaders; see the module docstring) ----------------------------------------------------
FP8_NAMES = re.compile(r"(^|\.)(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]"
                       r"|main_proj)\.weight$")
EXPERT_NAMES = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")
FP32_NAMES = re.compile(r"(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|\.ape|\.gate\.bias)$")
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def storage(name: str, experts: str) -> str:
    if EXPERT_NAMES.search(name):
        return experts
    if FP8_NAMES.search(name):
        return "fp8"
    if FP32_NAMES.search(name):
        return "fp32"
    return "int" if name.endswith("tid2eid") else "bf16"


# ---- quantizers, from the format's definition ---------------------------------------------------------------------

def pow2_ceil_exponent(x: torch.Tensor) -> torch.Tensor:
    """The integer e with 2^(e-1) < x <= 2^e, exactly (no log rounding)."""
    mantissa, exponent = torch.frexp(x.double())  # x = m * 2^exp, m in [0.5, 1)
    return torch.where(mantissa == 0.5, exponent - 1, exponent)


def e8m0_bytes(exponent: torch.Tensor) -> torch.Tensor:
    return (exponent + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def quantize_fp8_block(w: torch.Tensor, e8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    br, bc = -(-rows // 128), -(-cols // 128)
    padded = torch.zeros(br * 128, bc * 128, dtype=torch.float64)
    padded[:rows, :cols] = w.double()
    amax = padded.view(br, 128, bc, 128).abs().amax(dim=(1, 3)).clamp_min(1e-4)
    if e8m0:
        exponent = pow2_ceil_exponent(amax / 448)
        scale, scale_value = e8m0_bytes(exponent), torch.ldexp(torch.ones_like(amax), exponent)
    else:
        scale = (amax / 448).float()
        scale_value = scale.double()
    per_element = scale_value[torch.arange(rows)[:, None] // 128, torch.arange(cols)[None, :] // 128]
    return (w.double() / per_element).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    groups = w.double().view(rows, cols // 32, 32)
    exponent = pow2_ceil_exponent(groups.abs().amax(-1).clamp_min(6 * 2.0**-126) / 6)
    x = groups / torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), exponent)[..., None]
    magnitude = (x.abs()[..., None] - torch.tensor(E2M1, dtype=torch.float64)).abs().argmin(-1)
    codes = (magnitude + 8 * (x < 0)).view(rows, cols)
    packed = codes[:, 0::2] + 16 * codes[:, 1::2]  # element 2j in the low nibble, 2j+1 in the high one
    return packed.to(torch.uint8).view(torch.int8), e8m0_bytes(exponent)


def quantize(released: dict[str, torch.Tensor], experts: str) -> dict[str, torch.Tensor]:
    """The released-name tensors as the real checkpoint stores them: `experts` is fp4 (MXFP4, and e8m0 FP8 scales,
    as V4-Flash) or fp8 (FP8 block experts, float32 FP8 scales, as V4-Flash-Base)."""
    stored = {}
    for name, t in released.items():
        kind = storage(name, experts)
        if kind in ("fp8", "fp4"):
            weight, scale = quantize_mxfp4(t) if kind == "fp4" else quantize_fp8_block(t, e8m0=experts == "fp4")
            stored[name], stored[name.removesuffix(".weight") + ".scale"] = weight, scale
        else:
            stored[name] = {"fp32": t.float(), "bf16": t.bfloat16(), "int": t.long()}[kind].contiguous()
    return stored


# ---- the independent oracle ---------------------------------------------------------------------------------------

def decode_e4m3(t: torch.Tensor) -> torch.Tensor:
    b = t.view(torch.uint8).long()
    sign, exponent, mantissa = b >> 7, (b >> 3) & 0xF, b & 0x7
    value = torch.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * torch.pow(2.0, exponent - 7.0))
    value = torch.where((exponent == 15) & (mantissa == 7), torch.nan, value)
    return torch.where(sign == 1, -value, value).double()


def decode_e8m0(t: torch.Tensor) -> torch.Tensor:
    b = t.view(torch.uint8).double()
    return torch.where(b == 255, torch.nan, torch.pow(2.0, b - 127))


def decode_e2m1(code: torch.Tensor) -> torch.Tensor:
    sign, exponent, mantissa = code >> 3, (code >> 1) & 0x3, code & 0x1
    value = torch.where(exponent == 0, mantissa * 0.5, torch.pow(2.0, exponent - 1.0) * (1 + mantissa / 2))
    return torch.where(sign == 1, -value, value).double()


def oracle(stored: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    t, scale = stored[name], stored.get(name.removesuffix(".weight") + ".scale")
    if scale is None:
        if not t.is_floating_point():
            return t.long()
        return t if t.dtype == torch.float32 else t.to(dtype)
    s = decode_e8m0(scale) if scale.dtype == torch.float8_e8m0fnu else scale.double()
    if t.dtype == torch.float8_e4m3fn:
        values = decode_e4m3(t)
        rows, cols = values.shape
        per_element = s[torch.arange(rows)[:, None] // 128, torch.arange(cols)[None, :] // 128]
    else:
        b = t.view(torch.uint8).long()
        values = torch.empty(b.shape[0], 2 * b.shape[1], dtype=torch.float64)
        values[:, 0::2], values[:, 1::2] = decode_e2m1(b & 0xF), decode_e2m1(b >> 4)
        per_element = s[:, torch.arange(values.shape[1]) // 32]
    return (values * per_element).float().to(dtype)  # one fp32 rounding, then the cast


def error_bound(name: str, original: torch.Tensor, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """The largest |dequantized - original| the format allows, elementwise."""
    t, scale = stored[name], stored.get(name.removesuffix(".weight") + ".scale")
    w = original.double().abs()
    if scale is None:
        return w * 2.0**-8 if t.dtype == torch.bfloat16 else torch.zeros_like(w)
    s = decode_e8m0(scale) if scale.dtype == torch.float8_e8m0fnu else scale.double()
    rows, cols = w.shape
    if t.dtype == torch.float8_e4m3fn:  # e4m3: half a step is <= 2^-4 of a normal value, 2^-10 in the subnormals
        s = s[torch.arange(rows)[:, None] // 128, torch.arange(cols)[None, :] // 128]
        return torch.maximum(w * 2.0**-4, s * 2.0**-10) * (1 + 1e-6)
    s = s[:, torch.arange(cols) // 32]  # e2m1: half a step is <= a quarter of the value, or 0.25 below 1
    return torch.maximum(w * 0.25, s * 0.25) * (1 + 1e-6)


# ---- the tiny model and its checkpoints ---------------------------------------------------------------------------

def tiny_v4_config() -> DeepseekV4Config:
    """hidden 64, 4 layers: window / CSA (ratio 4) / HCA / CSA, one hash layer, 8 experts top-2; projections of 256
    and 160 rows or columns so the FP8 block grids have several and partial blocks."""
    return DeepseekV4Config(
        vocab_size=320, hidden_size=64, moe_intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        head_dim=64, q_lora_rank=160, partial_rotary_factor=0.25, o_groups=2, o_lora_rank=80,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, index_n_heads=2, index_head_dim=32, index_topk=4, sliding_window=16, hc_mult=4,
        max_position_embeddings=512)


def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every tensor random (transformers zeroes sinks, biases, position biases and tid2eid), with row and column
    magnitudes spread over e^±2 so neighbouring blocks get different scales."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("tid2eid"):
                t.copy_(torch.randint(0, model.config.n_routed_experts, t.shape, generator=generator))
            elif t.dim() >= 2:
                spread = torch.exp(torch.randn(*t.shape[:-1], 1, generator=generator)
                                   + torch.randn(*t.shape[:-2], 1, t.shape[-1], generator=generator))
                t.copy_(torch.randn(t.shape, generator=generator) * spread * 0.05)
            else:
                t.copy_(torch.randn(t.shape, generator=generator))


def stage_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A few tensors of a DSpark stage (mtp.0.*), unquantized."""
    def rnd(*shape):
        return torch.randn(*shape, generator=generator) * 0.05
    return {"mtp.0.main_proj.weight": rnd(64, 192), "mtp.0.attn.wq_a.weight": rnd(160, 64),
            "mtp.0.attn_norm.weight": rnd(64), "mtp.0.hc_attn_fn": rnd(24, 256),
            "mtp.0.ffn.experts.0.w1.weight": rnd(96, 64)}


def write_checkpoint(path, stored: dict[str, torch.Tensor], shards: int | None = 3):
    """`shards` files round-robin in name order (so a weight and its scale land in different files) with an index,
    or one model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    if shards is None:
        save_file(stored, str(path / "model.safetensors"))
        return path
    names = sorted(stored)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {n: files[i % shards] for i, n in enumerate(names)}
    for file in files:
        save_file({n: stored[n] for n in names if weight_map[n] == file}, str(path / file))
    total = sum(t.numel() * t.element_size() for t in stored.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def tiny_v4():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(tiny_v4_config()).float()
    randomize(model, generator)
    released = released_state_from_transformers(model.state_dict())
    return model, released, stage_tensors(generator)


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in state.items()}


# ---- (1) a quantized, sharded checkpoint loads to the oracle's tensors ---------------------------------------------

@pytest.mark.parametrize("experts,shards", [("fp4", 3), ("fp8", None)], ids=["fp4-experts-sharded", "fp8-single"])
def test_quantized_checkpoint_loads_exactly(tiny_v4, tmp_path, experts, shards):
    model, released, stages = tiny_v4
    stored = quantize(released | stages, experts)
    kinds = {storage(n, experts) for n in released}
    assert kinds == {experts, "fp8", "bf16", "fp32", "int"}
    write_checkpoint(tmp_path, stored, shards)

    for dtype in (torch.bfloat16, torch.float32):
        target, stage = load_v4_state(tmp_path, dtype, expected=shapes(released), expected_stages=shapes(stages))
        assert set(target) == set(released) and set(stage) == set(stages)
        for name, got in (target | stage).items():
            want = oracle(stored, name, dtype)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got, want), name  # bitwise, no NaN anywhere
            if dtype == torch.float32:
                original = (released | stages)[name]
                err = (got.double() - original.double()).abs()
                assert (err <= error_bound(name, original, stored)).all(), name

    # the transformers mapping is complete: the loaded tensors fill a fresh model exactly, and map back unchanged
    round_trip = transformers_state_from_released(target)
    fresh = DeepseekV4ForCausalLM(tiny_v4_config()).float()
    fresh.load_state_dict(round_trip, strict=True)
    assert set(round_trip) == set(model.state_dict())
    back = released_state_from_transformers(round_trip)
    assert set(back) == set(target) and all(torch.equal(back[n], target[n]) for n in target)


def test_name_mapping_both_ways(tiny_v4):
    model, released, _ = tiny_v4
    assert "layers.0.ffn.gate.tid2eid" in released and "layers.0.ffn.gate.bias" not in released  # hash layer
    assert "layers.1.ffn.gate.bias" in released and "layers.1.ffn.gate.tid2eid" not in released
    assert "layers.1.attn.indexer.compressor.ape" in released and "layers.2.attn.indexer.wq_b.weight" not in released
    assert "layers.0.attn.compressor.wkv.weight" not in released  # window-only layer
    assert released["layers.1.attn.compressor.ape"].shape == (4, 128)  # CSA: two overlapping series, 2 x head_dim
    assert released["layers.2.attn.compressor.ape"].shape == (8, 64)
    gate_up = model.state_dict()["model.layers.3.mlp.experts.gate_up_proj"]
    assert torch.equal(released["layers.3.ffn.experts.5.w1.weight"], gate_up[5, :96])
    assert torch.equal(released["layers.3.ffn.experts.5.w3.weight"], gate_up[5, 96:])
    for name in model.state_dict():
        if ".mlp.experts." not in name:
            assert transformers_name(released_name(name)) == name
    with pytest.raises(ValueError, match="model.layers.0.self_attn.nope"):
        released_name("model.layers.0.self_attn.nope")
    with pytest.raises(ValueError, match="layers.0.attn.nope"):
        transformers_name("layers.0.attn.nope")


# ---- (2) a scale in a transposed layout fails, naming the tensor ---------------------------------------------------

@pytest.mark.parametrize("name", ["layers.0.attn.wo_a.weight", "layers.1.ffn.experts.3.w2.weight"])
def test_transposed_scale_fails_naming_the_tensor(tiny_v4, tmp_path, name):
    _, released, _ = tiny_v4
    stored = quantize(released, "fp4")
    scale = name.removesuffix(".weight") + ".scale"
    assert stored[scale].shape[0] != stored[scale].shape[1]
    stored[scale] = stored[scale].t().contiguous()
    write_checkpoint(tmp_path, stored)
    with pytest.raises(ValueError, match=re.escape(name)):
        load_v4_state(tmp_path, torch.bfloat16)


# ---- (3) missing, unexpected and mis-shaped keys fail, naming the key ----------------------------------------------

@pytest.fixture(scope="module")
def written(tiny_v4, tmp_path_factory):
    _, released, stages = tiny_v4
    stored = quantize(released | stages, "fp4")
    return write_checkpoint(tmp_path_factory.mktemp("v4"), stored), released, stored


def test_missing_key_is_named(written):
    path, released, _ = written
    expected = shapes(released) | {"layers.2.attn.indexer.wq_b.weight": (64, 160)}
    with pytest.raises(ValueError, match=r"missing key\(s\) \[.layers.2.attn.indexer.wq_b.weight'\]"):
        load_v4_state(path, torch.bfloat16, expected=expected)


def test_unexpected_key_is_named(written):
    path, released, _ = written
    expected = {n: s for n, s in shapes(released).items() if n != "layers.1.attn.indexer.weights_proj.weight"}
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['layers.1.attn.indexer.weights_proj.weight'\]"):
        load_v4_state(path, torch.bfloat16, expected=expected)


def test_misshaped_key_is_named_with_both_shapes(written):
    path, released, _ = written
    expected = shapes(released) | {"layers.2.ffn.experts.7.w1.weight": (96, 128)}
    with pytest.raises(ValueError, match=re.escape("key layers.2.ffn.experts.7.w1.weight has shape (96, 64) in the "
                                                   "checkpoint, the model wants (96, 128)")):
        load_v4_state(path, torch.bfloat16, expected=expected)


def test_stage_keys_are_checked_apart(written):
    path, released, _ = written
    with pytest.raises(ValueError, match=r"DSpark stages.*missing key\(s\) \['mtp.0.attn.wq_b.weight'\]"):
        load_v4_state(path, torch.bfloat16, expected=shapes(released), expected_stages={
            "mtp.0.attn.wq_b.weight": (256, 160)})


def test_scale_without_weight_and_weight_without_scale_are_named(written, tmp_path):
    _, _, stored = written
    orphan = stored | {"layers.0.attn.ghost.scale": stored["layers.0.attn.wq_a.scale"].clone()}
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['layers.0.attn.ghost.scale'\]"):
        load_v4_state(write_checkpoint(tmp_path / "orphan", orphan, None), torch.bfloat16)
    unscaled = {n: t for n, t in stored.items() if n != "layers.2.attn.wq_b.scale"}
    with pytest.raises(ValueError, match=r"layers.2.attn.wq_b.weight is stored as F8_E4M3 but its block scale "
                                         r"layers.2.attn.wq_b.scale is missing"):
        load_v4_state(write_checkpoint(tmp_path / "unscaled", unscaled, None), torch.bfloat16)


def test_index_that_disagrees_with_its_shards_is_named(written, tmp_path):
    _, _, stored = written
    path = write_checkpoint(tmp_path / "bad", stored)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["layers.0.attn.wq_z.weight"] = index["weight_map"]["norm.weight"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="layers.0.attn.wq_z.weight is listed in the index"):
        load_v4_state(path, torch.bfloat16)
    index["weight_map"]["layers.0.attn.wq_z.weight"] = "model-00009-of-00009.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00009-of-00009.safetensors"):
        load_v4_state(path, torch.bfloat16)


# ---- (4) e2m1 nibble order, e8m0 and block indexing on hand-computed bytes -----------------------------------------

def test_e2m1_low_nibble_is_the_even_element():
    """Byte 0x21 holds code 1 (0.5) in its low nibble and code 2 (1.0) in its high one: element 0 is the low nibble,
    as DeepSeek's convert.py, vLLM and SGLang unpack it. 0x9F: low F = -6, high 9 = -0.5; 0x70: 0, 6."""
    packed = torch.zeros(2, 16, dtype=torch.uint8)
    packed[0, :3] = torch.tensor([0x21, 0x9F, 0x70], dtype=torch.uint8)
    packed[1, 0] = 0x21
    scale = torch.tensor([[127], [125]], dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 2^0 and 2^-2
    got = dequant_mxfp4(packed.view(torch.int8), scale)
    assert got.shape == (2, 32)
    assert got[0, :6].tolist() == [0.5, 1.0, -6.0, -0.5, 0.0, 6.0] and not got[0, 6:].any()
    assert got[1, :2].tolist() == [0.125, 0.25] and not got[1, 2:].any()


def test_e8m0_decodes_to_powers_of_two():
    raw = torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8)
    got = e8m0_to_float(raw.view(torch.float8_e8m0fnu))
    assert got[:6].tolist() == [2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 2.0**127] and got[6].isnan()
    assert torch.equal(e8m0_to_float(raw[:6]), got[:6])  # raw bytes read the same
    assert math.isclose(2.0**-127, 5.877471754111438e-39)


def test_fp8_block_indexing_on_a_partial_grid():
    """e4m3 0x38 = 1.0 (exponent 7, mantissa 0), 0xC0 = -2.0; a [130, 129] weight has a 2x2 block grid whose last
    row and column blocks are partial: w[i, j] = fp8[i, j] * scale[i // 128, j // 128]."""
    weight = torch.full((130, 129), 0x38, dtype=torch.uint8)
    weight[129, 128] = 0xC0
    scale = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    got = dequant_fp8_block(weight.view(torch.float8_e4m3fn), scale, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert got[127, 127] == 1 and got[0, 128] == 2 and got[128, 0] == 3 and got[129, 127] == 3
    assert got[128, 128] == 0.5 and got[129, 128] == -1.0
    e8m0_scale = torch.tensor([[127, 128], [129, 126]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert dequant_fp8_block(weight.view(torch.float8_e4m3fn), e8m0_scale)[128, 0] == 4
    with pytest.raises(ValueError, match=r"needs a \[128x128\]-block scale of shape \(2, 2\), got \(2, 1\)"):
        dequant_fp8_block(weight.view(torch.float8_e4m3fn), scale[:, :1])
