"""Read a DeepSeek-V4 checkpoint in its released format into dequantized tensors keyed by the released names.

The released layout (DeepSeek-V4-Flash / -Pro / -DSpark / -0731 on the Hub):

- safetensors, sharded with `model.safetensors.index.json` (`weight_map`: name -> shard file) or one
  `model.safetensors`. Names carry no `model.` prefix: `embed.weight`, `head.weight`, `norm.weight`,
  `hc_head_{fn,base,scale}`, `layers.N.{attn_norm,ffn_norm}.weight`, `layers.N.hc_{attn,ffn}_{fn,base,scale}`,
  `layers.N.attn.{wq_a,q_norm,wq_b,wkv,kv_norm,wo_a,wo_b}.weight`, `layers.N.attn.attn_sink`; on compressed layers
  `layers.N.attn.compressor.{wkv,wgate,norm}.weight` + `.compressor.ape`; on ratio-4 (CSA) layers also
  `layers.N.attn.indexer.{wq_b,weights_proj}.weight`, `layers.N.attn.indexer.compressor.{wkv,wgate,norm}.weight` +
  `.indexer.compressor.ape`; MoE `layers.N.ffn.gate.weight`, then `layers.N.ffn.gate.bias` (the noaux_tc correction
  bias) on routed layers or `layers.N.ffn.gate.tid2eid` on the first `num_hash_layers` (hash) layers -- never both;
  `layers.N.ffn.experts.E.{w1,w2,w3}.weight`, `layers.N.ffn.shared_experts.{w1,w2,w3}.weight`. The DSpark stages
  (or the June NextN block) live under `mtp.K.`; they are returned apart from the target's tensors.
- FP8 weights: float8_e4m3fn with one scale per 128x128 block under `<name without .weight>.scale`, shape
  [ceil(out/128), ceil(in/128)], w[i, j] = fp8[i, j] * scale[i // 128, j // 128]. The scales are float8_e8m0fnu
  ("ue8m0", 2^(e-127), byte 255 = NaN) in the FP4-expert checkpoints and float32 in the FP8-expert ones (Flash-Base).
  Quantized: wq_a, wq_b, wkv, wo_a, wo_b, indexer.wq_b, the shared experts (and the routed experts when
  `expert_dtype` is fp8). Not quantized: embed/head/norms/gate.weight/compressor and indexer-compressor wkv/wgate/
  indexer.weights_proj in bf16 (no scale); hc_*, attn_sink, ape, gate.bias in float32; tid2eid an integer table.
- FP4 routed experts (MXFP4, `expert_dtype: fp4`): e2m1 codes packed two per byte -- the LOW nibble is the even
  element, the high nibble the odd one -- stored as int8 [out, in/2], with one e8m0 scale per 32 consecutive input
  values, [out, in/32]. e2m1: sign bit 3, magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6} for codes 0..7.

On the CPU everything is dequantized at load, in float32, then cast to the requested dtype. Tensors stored in float32
stay float32 (they are the ones transformers keeps in fp32: hc_*, attn_sink, ape, gate.bias); integer tables become
int64.

Sources followed (learned from, not copied):
- vLLM `vllm/model_executor/models/deepseek_v4.py` (vllm-project/vllm): the released names, `.scale` ->
  `weight_scale_inv` for FP8 block scales, e8m0 scales iff `expert_dtype == "fp4"` (float32 for Flash-Base), MXFP4
  experts stored [out, in/2] bytes + [out, in/32] scales, no correction bias on hash layers, `mtp.` skipped by the
  target loader; vLLM's nvfp4 test utilities (`break_fp4_bytes`: low nibble = even element).
- SGLang `python/sglang/srt/models/deepseek_v4.py` (sgl-project/sglang): `_dequant_fp8` (scale [N/128, K/128],
  e8m0 or float32, w * scale per block) and its `cast_e2m1fn_to_e4m3fn` in the FP8 quantization code.
- DeepSeek's own `inference/convert.py` of DeepSeek-V4-Flash (as copied with attribution in several public repos):
  `FP4_TABLE` and `torch.stack([table[x & 0x0F], table[x >> 4]], -1)` -- low nibble first; int8 experts, scales
  [out, in/32]. DeepSeek's `inference/model.py` (via the same copies): `Gate` has `tid2eid` and no bias on hash
  layers, a float32 bias otherwise; `Compressor.ape` float32 [ratio, coff * head_dim] with coff = 2 on ratio 4.
- transformers 5.24 `models/deepseek_v4/modeling_deepseek_v4.py` (parameter names and shapes) and
  `conversion_mapping.py` (its released -> transformers renames, mirrored below); its comment that the compressor /
  indexer projections ship in bf16 without a scale.
"""
import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

FP8_BLOCK = 128
MX_GROUP = 32
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = torch.tensor(E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES), dtype=torch.float32)
PACKED_FP4_DTYPES = (torch.int8, torch.uint8, torch.float4_e2m1fn_x2)
STAGE_PREFIX = "mtp."
PARTS = ("target", "stages")  # the target's tensors, the DSpark stages' (mtp.*)
# safetensors header dtypes of the FP8 and packed-FP4 payloads (read without loading the tensor); a float4_e2m1fn_x2
# tensor ("F4") has its unpacked shape in the header, an int8/uint8 one ("I8"/"U8") its packed shape
FP8_STORAGE, FP4_STORAGE, FP4_UNPACKED_HEADER = {"F8_E4M3"}, {"I8", "U8", "F4"}, "F4"


# ---- the pure dequantizers ----------------------------------------------------------------------------------------

def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu (or its raw uint8 bytes) -> float32 2^(byte - 127); byte 255 is NaN."""
    if scale.dtype == torch.uint8:
        scale = scale.view(torch.float8_e8m0fnu)
    if scale.dtype != torch.float8_e8m0fnu:
        raise ValueError(f"an e8m0 scale must be float8_e8m0fnu or uint8, got {scale.dtype}")
    return scale.to(torch.float32)


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """A block scale as float32: e8m0 bytes decoded, float32/bf16 scales taken as they are."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return e8m0_to_float(scale)
    if not scale.is_floating_point() or scale.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"unsupported scale dtype {scale.dtype}")
    return scale.to(torch.float32)


def dequant_fp8_block(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                      block: int = FP8_BLOCK) -> torch.Tensor:
    """float8_e4m3fn [out, in] with one scale per block x block tile, [ceil(out/block), ceil(in/block)] ->
    w[i, j] = fp8[i, j] * scale[i // block, j // block], computed in float32 and cast to dtype."""
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(f"an FP8 block-scaled weight is a 2-D float8_e4m3fn tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    rows, cols = weight.shape
    want = (-(-rows // block), -(-cols // block))
    if tuple(scale.shape) != want:
        raise ValueError(f"FP8 weight {tuple(weight.shape)} needs a [{block}x{block}]-block scale of shape {want}, "
                         f"got {tuple(scale.shape)}")
    s = scale_to_float(scale).repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (weight.to(torch.float32) * s).to(dtype)


def dequant_mxfp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                  group: int = MX_GROUP) -> torch.Tensor:
    """MXFP4 [out, in/2] bytes (int8/uint8/float4_e2m1fn_x2; low nibble = even element) with one e8m0 scale per
    `group` input values, [out, in/group] -> float32 values * scales, cast to dtype."""
    if packed.dtype not in PACKED_FP4_DTYPES or packed.dim() != 2:
        raise ValueError(f"an MXFP4 weight is a 2-D int8/uint8 tensor of packed e2m1 pairs, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    rows, cols = packed.shape[0], packed.shape[1] * 2
    if cols % group:
        raise ValueError(f"MXFP4 weight {tuple(packed.shape)} unpacks to {cols} inputs, not a multiple of {group}")
    want = (rows, cols // group)
    if tuple(scale.shape) != want:
        raise ValueError(f"MXFP4 weight {tuple(packed.shape)} (unpacked [{rows}, {cols}]) needs one scale per "
                         f"{group} inputs, shape {want}, got {tuple(scale.shape)}")
    raw = packed.view(torch.uint8)
    codes = torch.stack((raw & 0x0F, raw >> 4), dim=-1).reshape(rows, cols)
    values = E2M1_VALUES[codes.long()]
    return (values * e8m0_to_float(scale).repeat_interleave(group, 1)).to(dtype)


@dataclass
class StoredTensor:
    """A weight as read from the checkpoint: kind fp8 (data float8_e4m3fn [out, in]) or fp4 (data packed bytes
    [out, in/2]), with its scale tensor; shape is the dense [out, in]."""
    name: str
    kind: str
    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.data.shape
        return (rows, cols * 2) if self.kind == "fp4" else (rows, cols)

    def take_shard(self, shard) -> "StoredTensor":
        """This rank's rows or columns (engine/parallel.Shard), cut along whole scale blocks."""
        block = FP8_BLOCK if self.kind == "fp8" else (1 if shard.dim == 0 else MX_GROUP)
        for start, count in shard.ranges:
            if start % block or (count % block and start + count != self.shape[shard.dim]):
                raise ValueError(f"{self.name}: tensor parallelism cuts its dim {shard.dim} at {start}..{start + count}"
                                 f", inside a {block}-wide block of its {self.kind} scales (use quantization='none')")
        packed = 2 if self.kind == "fp4" and shard.dim == 1 else 1
        data = torch.cat([self.data.narrow(shard.dim, s // packed, c // packed) for s, c in shard.ranges], shard.dim)
        scale = torch.cat([self.scale.narrow(shard.dim, s // block, -(-c // block)) for s, c in shard.ranges],
                          shard.dim)
        return StoredTensor(self.name, self.kind, data.contiguous(), scale.contiguous())


# ---- reading the checkpoint ---------------------------------------------------------------------------------------

def weight_map(model_dir: str | Path) -> dict[str, Path]:
    """Released name -> the safetensors file holding it, from the index or the single file."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = {name: model_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"weight shard {file} listed in {index} is missing")
        return files
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def scale_name(weight_name: str) -> str | None:
    return weight_name.removesuffix(".weight") + ".scale" if weight_name.endswith(".weight") else None


class _Reader:
    """Open shards on demand; tensors and header facts (shape, dtype string) by released name."""

    def __init__(self, files: dict[str, Path], stack: ExitStack):
        self.files, self.stack, self.open = files, stack, {}

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self.open:
            self.open[file] = self.stack.enter_context(safe_open(str(file), framework="pt"))
        handle = self.open[file]
        if name not in handle.keys():
            raise ValueError(f"{name} is listed in the index under {file.name} but that file does not hold it")
        return handle

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        piece = self._handle(name).get_slice(name)
        return tuple(piece.get_shape()), piece.get_dtype()


def _plan(names: list[str], reader: _Reader) -> dict[str, tuple[str, str | None, tuple[int, ...]]]:
    """Released tensor name -> (how it is stored: fp8 | fp4 | plain, its scale's name, its dequantized shape),
    from the headers alone. A scale without its weight, or a quantized payload without a scale, is an error."""
    present = set(names)
    scales = {n for n in names if n.endswith(".scale") and n.removesuffix(".scale") + ".weight" in present}
    orphans = sorted(n for n in names if n.endswith(".scale") and n not in scales)
    if orphans:
        raise ValueError(f"unexpected key(s) {orphans[:5]}: a block scale without its weight "
                         f"({orphans[0].removesuffix('.scale')}.weight is not in the checkpoint)")
    plan = {}
    for name in names:
        if name in scales:
            continue
        shape, stored = reader.header(name)
        scale = scale_name(name)
        if scale not in scales:
            if stored in FP8_STORAGE or (stored in FP4_STORAGE and name.endswith(".weight")):
                raise ValueError(f"{name} is stored as {stored} but its block scale {scale} is missing")
            plan[name] = ("plain", None, shape)
        elif stored in FP8_STORAGE:
            plan[name] = ("fp8", scale, shape)
        elif stored in FP4_STORAGE:
            plan[name] = ("fp4", scale, shape if stored == FP4_UNPACKED_HEADER else shape[:-1] + (shape[-1] * 2,))
        else:
            raise ValueError(f"{name} has a block scale {scale} but is stored as {stored}, neither FP8 nor packed FP4")
    return plan


def check_expected(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Every key the model wants is there with its shape, and nothing else: a ValueError naming the keys."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(n for n in set(found) & set(expected) if tuple(found[n]) != tuple(expected[n]))
    problems = []
    if missing:
        problems.append(f"missing key(s) {missing[:8]}" + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected key(s) {unexpected[:8]}"
                        + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
    for n in misshaped[:8]:
        problems.append(f"key {n} has shape {tuple(found[n])} in the checkpoint, the model wants {tuple(expected[n])}")
    if problems:
        raise ValueError(f"{what} does not match the model: " + "; ".join(problems))


def _load_one(reader: _Reader, name: str, kind: str, scale: str | None, dtype: torch.dtype,
              keep_quantized: bool = False) -> torch.Tensor | StoredTensor:
    if keep_quantized and kind in ("fp8", "fp4"):
        return StoredTensor(name, kind, reader.tensor(name), reader.tensor(scale))
    try:
        if kind == "fp8":
            return dequant_fp8_block(reader.tensor(name), reader.tensor(scale), dtype)
        if kind == "fp4":
            return dequant_mxfp4(reader.tensor(name), reader.tensor(scale), dtype)
    except ValueError as e:
        raise ValueError(f"{name} (scale {scale}): {e}") from None
    t = reader.tensor(name)
    if not t.is_floating_point():
        return t.to(torch.int64)
    return t if t.dtype == torch.float32 else t.to(dtype)


def load_v4_state(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                  expected: dict[str, tuple[int, ...]] | None = None,
                  expected_stages: dict[str, tuple[int, ...]] | None = None, parts: tuple[str, ...] = PARTS,
                  keep_quantized: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(target tensors, DSpark-stage tensors) by released name, dequantized: FP8 and MXFP4 weights and bf16 tensors
    to `dtype`, float32 tensors kept float32, integer tables as int64. Stage tensors keep their `mtp.K.` names.
    `expected` (name -> shape of each target tensor the model wants) and `expected_stages` are checked from the
    headers before anything is read: a missing, unexpected or mis-shaped key is a ValueError naming it. Only the
    `parts` asked for ("target", "stages") are read; the other comes back empty. keep_quantized: FP8 / MXFP4 weights
    come back as StoredTensors (bytes and scales as stored) instead."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dequantize to bf16, fp16 or fp32, not {dtype}")
    files = weight_map(model_dir)
    with ExitStack() as stack:
        reader = _Reader(files, stack)
        plan = _plan(sorted(files), reader)
        target = {n: p for n, p in plan.items() if not n.startswith(STAGE_PREFIX)}
        stages = {n: p for n, p in plan.items() if n.startswith(STAGE_PREFIX)}
        if expected is not None:
            check_expected({n: p[2] for n, p in target.items()}, expected, f"the checkpoint in {model_dir}")
        if expected_stages is not None:
            check_expected({n: p[2] for n, p in stages.items()}, expected_stages,
                           f"the DSpark stages ({STAGE_PREFIX}*) in {model_dir}")
        return tuple({n: _load_one(reader, n, kind, scale, dtype, keep_quantized)
                      for n, (kind, scale, _) in plans.items()}
                     if part in parts else {} for part, plans in zip(PARTS, (target, stages)))


# ---- transformers 5.24 names <-> released names -------------------------------------------------------------------

TOP_LEVEL_NAMES = {  # transformers DeepseekV4ForCausalLM -> released
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}
LAYER_NAMES = {  # after `model.layers.N.` -> after `layers.N.`
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn",
    "attn_hc.base": "hc_attn_base",
    "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn",
    "ffn_hc.base": "hc_ffn_base",
    "ffn_hc.scale": "hc_ffn_scale",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
}
# transformers stacks the routed experts: gate_up_proj [E, 2I, D] (gate = w1 first half, up = w3 second half),
# down_proj [E, D, I] (w2); the released checkpoint has one [out, in] tensor per expert and projection.
PACKED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
RELEASED_OF_LAYER = {v: k for k, v in LAYER_NAMES.items()}
TRANSFORMERS_OF_TOP = {v: k for k, v in TOP_LEVEL_NAMES.items()}


def _split_layer(name: str, prefix: str) -> tuple[int, str] | None:
    if not name.startswith(prefix):
        return None
    index, _, rest = name[len(prefix):].partition(".")
    return (int(index), rest) if index.isdigit() and rest else None


def _rename(name: str, top: dict[str, str], layer: dict[str, str], source: str, target: str, what: str) -> str:
    if name in top:
        return top[name]
    split = _split_layer(name, source)
    if split and split[1] in layer:
        return f"{target}{split[0]}.{layer[split[1]]}"
    raise ValueError(f"no {what} {name}")


def released_name(name: str) -> str:
    """The released name of one transformers parameter (not the stacked experts)."""
    return _rename(name, TOP_LEVEL_NAMES, LAYER_NAMES, "model.layers.", "layers.",
                   "released name for transformers parameter")


def transformers_name(name: str) -> str:
    """The transformers name of one released tensor (not a per-expert one)."""
    return _rename(name, TRANSFORMERS_OF_TOP, RELEASED_OF_LAYER, "layers.", "model.layers.",
                   "transformers name for released tensor")


def released_state_from_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers DeepseekV4ForCausalLM state dict -> the released names (experts split per expert), unquantized
    and in the given dtypes. Tied embeddings give both `embed.weight` and `head.weight`."""
    out = {}
    for name, t in state_dict.items():
        split = _split_layer(name, "model.layers.")
        if split and split[1] == PACKED_EXPERTS[0]:
            inner = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"layers.{split[0]}.ffn.experts.{e}.w1.weight"] = t[e, :inner].contiguous()
                out[f"layers.{split[0]}.ffn.experts.{e}.w3.weight"] = t[e, inner:].contiguous()
        elif split and split[1] == PACKED_EXPERTS[1]:
            for e in range(t.shape[0]):
                out[f"layers.{split[0]}.ffn.experts.{e}.w2.weight"] = t[e].contiguous()
        else:
            out[released_name(name)] = t
    return out


def transformers_state_from_released(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse: released names (target tensors only) -> a DeepseekV4ForCausalLM state dict."""
    out, experts = {}, {}
    for name, t in state.items():
        split = _split_layer(name, "layers.")
        if split and split[1].startswith("ffn.experts."):
            expert = _split_layer(split[1], "ffn.experts.")
            if expert is None or expert[1] not in ("w1.weight", "w2.weight", "w3.weight"):
                raise ValueError(f"no transformers name for released tensor {name}")
            experts.setdefault(split[0], {}).setdefault(expert[0], {})[expert[1][:2]] = t
        else:
            out[transformers_name(name)] = t
    for layer, by_expert in experts.items():
        ids = sorted(by_expert)
        if ids != list(range(len(ids))) or any(len(by_expert[e]) != 3 for e in ids):
            raise ValueError(f"layer {layer}'s routed experts are incomplete: experts {ids}, each needs w1, w2, w3")
        out[f"model.layers.{layer}.{PACKED_EXPERTS[0]}"] = torch.stack(
            [torch.cat((by_expert[e]["w1"], by_expert[e]["w3"])) for e in ids])
        out[f"model.layers.{layer}.{PACKED_EXPERTS[1]}"] = torch.stack([by_expert[e]["w2"] for e in ids])
    return out
