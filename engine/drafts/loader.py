"""Read a DeepSpec-format draft directory (config.json + model.safetensors or a sharded index) and check that it fits
the target it will draft for."""
import json
from pathlib import Path

import torch

from engine.calibration import load_scaling
from engine.drafts.dspark import DraftConfig, DSparkDraft
from engine.drafts.heads import SEQUENTIAL_HEADS
from engine.drafts.v4_dspark import V4DSparkDraft, build_draft, declares_dspark, finish_load
from engine.loader import read_tensors
from engine.models.decoder import DecoderModel
from engine.models.deepseek_v4.checkpoint import load_v4_state, weight_map
from engine.models.deepseek_v4.model import V4Model
from engine.models.deepseek_v4.stored import assign_state
from engine.parallel import shard_state, whole_shapes

ARCHITECTURES = ("Qwen3DSparkModel",)
CALIBRATION_FILE = "sts.json"  # {"temperatures": [T_1, ..., T_block_size]} from STS
VOCAB_FILE = "draft_vocab.json"  # {"token_ids": [most frequent first, ...]} from `python -m train draft-vocab`
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "rms_norm_eps", "vocab_size", "block_size", "target_layer_ids", "mask_token_id")
FUSED = {"kv_proj": ("k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
SHARED = ("embed_tokens.weight", "lm_head.weight")


def read_draft_config(draft_dir: Path, target: dict) -> DraftConfig:
    path = draft_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"draft directory {draft_dir} has no config.json")
    c = json.loads(path.read_text())
    arch = (c.get("architectures") or ["<none>"])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"draft {draft_dir}: architecture {arch!r} is not a DSpark/DFlash draft "
                         f"(expected one of {ARCHITECTURES})")
    missing = [k for k in REQUIRED if k not in c]
    if missing:
        raise ValueError(f"draft {draft_dir}: config.json lacks {missing}")
    check_fits_target(c, target, draft_dir)
    rank = int(c.get("markov_rank", 0))
    head = str(c.get("markov_head_type", "vanilla")).lower()
    if rank < 0 or (rank and head not in SEQUENTIAL_HEADS):
        raise ValueError(f"draft {draft_dir}: markov_rank {rank} / markov_head_type {head!r} unsupported "
                         f"(rank >= 0, type one of {list(SEQUENTIAL_HEADS)})")
    if c.get("attention_bias"):
        raise ValueError(f"draft {draft_dir}: attention_bias=true is not part of the DSpark draft format")
    return DraftConfig(
        hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        num_kv_heads=c["num_key_value_heads"],
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        block_size=int(c["block_size"]), target_layer_ids=list(c["target_layer_ids"]),
        mask_token_id=int(c["mask_token_id"]), markov_rank=rank, markov_head_type=head,
        confidence_head=bool(c.get("enable_confidence_head", False)),
        confidence_with_markov=bool(c.get("confidence_head_with_markov", False)) and rank > 0, hf=c)


def check_fits_target(c: dict, target: dict, draft_dir: Path):
    problems = []
    for key in ("hidden_size", "vocab_size"):
        if c[key] != target[key]:
            problems.append(f"{key} {c[key]} != the target's {target[key]}")
    n = target["num_hidden_layers"]
    if c.get("num_target_layers", n) != n:
        problems.append(f"num_target_layers {c['num_target_layers']} != the target's {n} layers")
    for layer in c["target_layer_ids"]:
        if layer == n - 1:
            problems.append(f"target layer {layer} is the target's last layer (not allowed as a draft feature)")
        elif not -1 <= layer < n - 1:
            problems.append(f"target layer id {layer} is out of range for a {n}-layer target")
    if not 0 <= c["mask_token_id"] < target["vocab_size"]:
        problems.append(f"mask_token_id {c['mask_token_id']} is outside the vocabulary")
    if c["block_size"] < 1:
        problems.append(f"block_size {c['block_size']} must be >= 1")
    if problems:
        raise ValueError(f"draft {draft_dir} does not match the target: " + "; ".join(problems))


def draft_state(tensors: dict[str, torch.Tensor], target: DecoderModel, draft_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpec names -> ours: fuse k/v and gate/up; verify and drop the copies of the target's embedding / LM head."""
    for name, module in zip(SHARED, (target.embed_tokens, target.lm_head)):
        if name not in tensors:
            continue
        shard, theirs = getattr(module, "shard", None), tensors.pop(name)  # tensor parallel: this rank's rows
        if not same_weights(shard.take(theirs) if shard else theirs, module.weight):
            raise ValueError(f"draft {draft_dir}: its {name} differs from the target's: it was trained for another "
                             "target model")
    for name in [n for n in tensors if n.startswith("layers.") and (".k_proj." in n or ".mlp.gate_proj." in n)]:
        for fused, parts in FUSED.items():
            if f".{parts[0]}." in name:
                tensors[name.replace(parts[0], fused)] = torch.cat([tensors.pop(name.replace(parts[0], p))
                                                                    for p in parts])
    return tensors


def same_weights(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, whatever the device or dtype of either (a checkpoint is read on the CPU, the target may sit on
    the GPU)."""
    return a.shape == b.shape and (torch.equal(a.to(b.device, b.dtype), b) or torch.equal(b.to(a.device, a.dtype), a))


def read_calibration(draft_dir: Path, block_size: int, file: str = "") -> tuple[torch.Tensor, torch.Tensor] | None:
    """sts.json's per-position temperatures and (optional, default 0) biases (from `file` instead when given: it must
    exist), or None without the file."""
    if file and not Path(file).is_file():
        raise FileNotFoundError(f"calibration_file {file} does not exist (write it with `python -m train calibrate "
                                "--out FILE.json`)")
    scaling = load_scaling(Path(file) if file else draft_dir / CALIBRATION_FILE, block_size)
    if scaling is None:
        return None
    return torch.tensor(scaling.temps, dtype=torch.float32), torch.tensor(scaling.biases, dtype=torch.float32)


def read_draft_vocab(draft_dir: Path, size: int, vocab_size: int) -> torch.Tensor | None:
    """The token ids the draft may propose: size 0 = all of draft_vocab.json's (the whole vocabulary without the
    file), size K = its K most frequent, size -1 = the whole vocabulary."""
    path = draft_dir / VOCAB_FILE
    if size < 0 or (size == 0 and not path.is_file()):
        return None
    if not path.is_file():
        raise ValueError(f"draft_vocab_size={size} needs the draft's token list {path} (python -m train draft-vocab)")
    return read_vocab_file(path, size, vocab_size)


def read_vocab_file(path: str | Path, size: int, vocab_size: int) -> torch.Tensor:
    """A draft_vocab.json's K most frequent token ids (size 0: all of them)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no draft token list at {path} (python -m train draft-vocab writes one)")
    data = json.loads(path.read_text())
    ids = data.get("token_ids") if isinstance(data, dict) else None
    if (not isinstance(ids, list) or not ids or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids)
            or len(set(ids)) != len(ids)):
        raise ValueError(f"{path}: 'token_ids' must be distinct token ids in [0, {vocab_size})")
    if size > len(ids):
        raise ValueError(f"draft_vocab_size={size} exceeds the {len(ids)} token ids in {path}")
    return torch.tensor(ids[:size or None])


def load_draft(draft_dir: str | Path, target: DecoderModel, dtype: torch.dtype, method: str,
               vocab_size: int = 0) -> DSparkDraft:
    """vocab_size: how many of the draft's frequent tokens it may propose (read_draft_vocab)."""
    draft_dir = Path(draft_dir)
    if not draft_dir.is_dir():
        raise FileNotFoundError(f"draft directory {draft_dir} does not exist")
    config = read_draft_config(draft_dir, target.config)
    if method == "dspark" and not config.markov_rank:
        raise ValueError(f"draft {draft_dir} has no sequential head (markov_rank 0): it is a DFlash draft, "
                         "use spec_method='dflash'")
    with torch.device("meta"):
        draft = DSparkDraft(config, use_sequential_head=method == "dspark")
    state = {n: t.to(dtype) for n, t in draft_state(read_tensors(draft_dir), target, draft_dir).items()}
    state = shard_state(state, draft)
    expected = draft.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    wrong = [f"{n} {tuple(state[n].shape)} != {tuple(expected[n].shape)}" for n in set(state) & set(expected)
             if state[n].shape != expected[n].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"draft weights in {draft_dir} do not match its config: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}, wrong shapes {wrong[:4]}")
    draft.load_state_dict(state, assign=True)
    draft.rotary = DSparkDraft.make_rotary(config)
    return attach(draft, target.embed_tokens, target.lm_head, draft_dir, vocab_size)


def attach(draft: DSparkDraft, embed: torch.nn.Module, head: torch.nn.Module, draft_dir: Path,
           vocab_size: int) -> DSparkDraft:
    """A loaded draft made ready: its STS calibration (identity without sts.json), the target's embedding and LM head,
    its FR-Spec vocabulary."""
    block = draft.config.block_size
    if draft.confidence_head is not None:  # always a tensor per position, so a reload can copy in place (graphs)
        draft.confidence_head.temperatures, draft.confidence_head.biases = (
            read_calibration(draft_dir, block) or (torch.ones(block), torch.zeros(block)))
    draft.attach_target(embed, head)
    token_ids = read_draft_vocab(draft_dir, vocab_size, draft.config.hf["vocab_size"])
    if token_ids is not None:
        draft.restrict_vocab(token_ids)
    return draft.eval().requires_grad_(False)


def load_v4_dspark(model_dir: str | Path, target: V4Model, dtype: torch.dtype, method: str,
                   vocab_size: int = 0, keep_quantized: bool = False) -> V4DSparkDraft:
    """DeepSeek-V4's DSpark module from the target's own checkpoint (its mtp.* tensors, dequantized as the target's
    or kept as stored)."""
    model_dir = Path(model_dir)
    if method != "dspark":
        raise ValueError(f"{model_dir}: DeepSeek-V4 drafts with the DSpark module in its checkpoint, "
                         f"spec_method='dspark' (got {method!r})")
    if not declares_dspark(target.config):
        raise ValueError(f"{model_dir}: config.json declares no DSpark module (no dspark_* keys): this checkpoint "
                         "has nothing to draft with; serve it with spec_method='none'")
    names = weight_map(model_dir)
    draft = build_draft(target.v4, target.config, names, str(model_dir))
    whole = whole_shapes(lambda: build_draft(target.v4, target.config, names, str(model_dir)))
    _, state = load_v4_state(model_dir, dtype, expected_stages=whole, parts=("stages",), keep_quantized=keep_quantized)
    assign_state(draft, shard_state(state, draft), f"the DSpark module in {model_dir}")  # this rank's slices
    return attach(finish_load(draft), target.embed, target.head, model_dir, vocab_size)


def load_any_draft(config, target: DecoderModel | V4Model, dtype: torch.dtype) -> DSparkDraft:
    """The draft an engine config asks for, calibrated by config.calibration_file when one is given (e.g. beside a
    read-only checkpoint) instead of its own sts.json."""
    draft = load_configured_draft(config, target, dtype)
    if config.calibration_file:
        if draft.confidence_head is None:
            raise ValueError(f"calibration_file {config.calibration_file}: the draft has no confidence head")
        head, block = draft.confidence_head, draft.config.block_size
        head.temperatures, head.biases = read_calibration(Path(config.draft), block, config.calibration_file)
    return draft


def load_configured_draft(config, target: DecoderModel | V4Model, dtype: torch.dtype) -> DSparkDraft:
    """A DeepSpec directory for a dense target, the in-checkpoint module (draft = the model directory) for
    DeepSeek-V4."""
    if not isinstance(target, V4Model):
        return load_draft(config.draft, target, dtype, config.spec_method, config.draft_vocab_size)
    if Path(config.draft).resolve() != Path(config.model).resolve():
        raise ValueError(f"draft {config.draft}: DeepSeek-V4 drafts only with the DSpark module in its own checkpoint; "
                         "leave draft unset")
    return load_v4_dspark(config.model, target, dtype, config.spec_method, config.draft_vocab_size,
                          config.quantization == "fp8")
