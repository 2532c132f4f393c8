import json
import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = Path(os.environ.get("DSPARK_MODELS_DIR", REPO_ROOT / "models"))
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_DRAFT = REPO_ROOT / "drafts" / "dspark-smollm2-135m"  # trained by train/configs/dspark_smollm2*.json
# `auto` serves the default model (bf16) with its committed draft, which pays on a native-bf16 CPU
# (docs/benchmarks.md); False: plainly.
DEFAULT_MODEL_SPECULATES = True
DEFAULT_MODEL_VERIFY_POLICY = "sps-lagged"  # drafts and verifies only what the measured step costs say pays
SPEC_METHODS = ("auto", "none", "dflash", "dspark")
DEVICES = ("auto", "cpu", "cuda")
KERNEL_BACKENDS = ("auto", "torch", "triton")
ATTENTION_BACKENDS = ("auto", "triton", "flashinfer")
QUANTIZATIONS = ("auto", "gguf", "fp8", "none")


def uses_cuda_graphs(config: "EngineConfig") -> bool:
    return (config.device == "cuda" and config.kernels == "triton" and not config.enforce_eager
            and config.tensor_parallel_size == 1)  # not yet around a step with collectives


def parse_verify_policy(text: str) -> tuple[str, float]:
    """'full', 'sps', 'sps-lagged' -> (kind, 0); 'fixed:k' -> ('fixed', k); 'threshold:c' -> ('threshold', c)."""
    kind, _, arg = text.partition(":")
    if kind in ("full", "sps", "sps-lagged") and not arg:
        return kind, 0
    if kind == "fixed" and arg.isdigit():
        return "fixed", int(arg)
    if kind == "threshold":
        try:
            value = float(arg)
        except ValueError:
            value = -1.0
        if 0 <= value <= 1:
            return "threshold", value
    raise ValueError("verify_policy must be full, fixed:k (k >= 0), threshold:c (0 <= c <= 1), sps or sps-lagged; "
                     f"got {text!r}")


def auto_kv_cache_gb() -> float:
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return min(8.0, max(0.5, physical / 10))


def v4_config_of(model: str) -> dict | None:
    """The config.json of a DeepSeek-V4 checkpoint directory; None for anything else."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    c = json.loads(path.read_text())
    return c if "DeepseekV4ForCausalLM" in (c.get("architectures") or []) else None


def ships_dspark(model: str) -> bool:
    """A DeepSeek-V4 checkpoint whose config declares the DSpark module it carries (V4-Flash-DSpark, -0731, ...)."""
    return any(k.startswith("dspark_") for k in v4_config_of(model) or {})


def resolve_auto_spec(model: str, draft: str, dtype: str = "bfloat16") -> tuple[str, str]:
    """A given draft decides its own method (a sequential head: dspark, else dflash); without one, a checkpoint that
    ships its DSpark module drafts with it (draft = the model directory), the embedded default model in bf16 (where
    its draft was measured to pay) gets its committed DSpark draft when DEFAULT_MODEL_SPECULATES, and any other model
    or dtype plain decoding."""
    if not draft and ships_dspark(model):
        return "dspark", model
    if draft:
        config = Path(draft) / "config.json"
        rank = json.loads(config.read_text()).get("markov_rank", 0) if config.is_file() else 1
        return ("dspark" if rank else "dflash"), draft
    is_default = Path(model).resolve() == (DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME).resolve()
    if DEFAULT_MODEL_SPECULATES and is_default and dtype == "bfloat16" and (DEFAULT_DRAFT / "config.json").is_file():
        return "dspark", str(DEFAULT_DRAFT)
    return "none", ""


def resolve_quantization(quantization: str, model: str, device: str, tensor_parallel_size: int = 1) -> str:
    """'auto' -> 'gguf' (weights kept in their GGUF block types) for a model with GGUF weights on one CPU process,
    'fp8' (kept as stored) for a DeepSeek-V4 checkpoint with FP8 weights on CUDA (on the CPU dequantizing at load
    lets the bf16 kernels run), else 'none' (dense weights in dtype), as vLLM picks its method from the checkpoint."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    has_gguf = any(Path(model).glob("*.gguf"))
    if quantization == "auto":
        if has_gguf:
            return "gguf" if device == "cpu" and tensor_parallel_size == 1 else "none"
        return "fp8" if device == "cuda" and has_fp8_v4_weights(model) else "none"
    if quantization == "fp8" and not has_fp8_v4_weights(model):
        raise ValueError(f"quantization='fp8' keeps a DeepSeek-V4 checkpoint's FP8 / MXFP4 weights as stored; {model} "
                         "is not one (its config.json has no fp8 quantization_config)")
    if quantization == "gguf" and not has_gguf:
        raise ValueError(f"quantization='gguf' needs GGUF weights (--model FILE.gguf); {model} has none")
    if quantization == "gguf" and device != "cpu":
        raise ValueError("quantization='gguf' runs on the CPU only (quantization='none' dequantizes at load)")
    return quantization


def has_fp8_v4_weights(model: str) -> bool:
    quantization = (v4_config_of(model) or {}).get("quantization_config") or {}
    return quantization.get("quant_method") in ("fp8", "deepseek_v4_fp8")


def resolve_device(device: str, kernels: str) -> tuple[str, str]:
    """'auto' -> the GPU when torch sees one; kernels 'auto' -> Triton on the GPU, the torch twins on CPU. Triton on
    CPU tensors only runs under its interpreter (TRITON_INTERPRET=1): slow, for tests."""
    import torch

    from kernels.triton_support import HAS_TRITON, INTERPRETING
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if kernels not in KERNEL_BACKENDS:
        raise ValueError(f"kernels must be one of {KERNEL_BACKENDS}, got {kernels!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU")
    if kernels == "auto":
        kernels = "triton" if device == "cuda" and HAS_TRITON else "torch"
    if kernels == "triton" and not HAS_TRITON:
        raise ValueError("kernels='triton' needs Triton installed (pip install '.[gpu]')")
    if kernels == "triton" and device == "cpu" and not INTERPRETING:
        raise ValueError("kernels='triton' on CPU needs TRITON_INTERPRET=1 (Triton's interpreter, for tests)")
    return device, kernels


def check_attention(attention: str, kernels: str):
    """The attention choice fits the kernels; 'auto' is settled by the model runner, which knows the head size."""
    from kernels import flashinfer_attention
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    if attention != "auto" and kernels != "triton":
        raise ValueError(f"attention={attention!r} runs on the Triton path (kernels='triton'), not kernels={kernels!r}")
    if attention == "flashinfer" and (reason := flashinfer_attention.unavailable_reason()):
        raise ValueError(f"attention='flashinfer' needs FlashInfer (pip install '.[gpu]'); importing it failed: "
                         f"{reason}")


@dataclass
class EngineConfig:
    """One flat set of options shared by the offline API, the server CLI and the benchmarks."""
    model: str = ""                      # model directory or GGUF file; "" = the embedded default
    dtype: str = "bfloat16"              # bfloat16 | float32: activations, and dense weights
    quantization: str = "auto"           # auto | gguf (a GGUF's weights in their own block types, CPU) | fp8
                                         # (DeepSeek-V4's FP8 / MXFP4 weights kept as stored, dequantized per call) |
                                         # none (dense in dtype); auto: gguf for GGUF weights on one CPU process, fp8
                                         # for a quantized DeepSeek-V4 checkpoint on CUDA
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int = 0               # 0 = the model's own context length
    kv_cache_gb: float = 0.0             # 0 = auto: CPU a tenth of RAM (0.5-8 GiB); GPU most of what is left free
    kv_block_size: int = 16
    enable_prefix_caching: bool = True   # reuse the K/V of full blocks whose token prefix was computed before
    prefix_cache_states: int = 0         # DeepSeek-V4: ring states kept at block ends for the prefix cache (a cached
                                         # prefix ends where one was kept); 0 = two per max_num_seqs
    num_threads: int = 0                 # 0 = leave torch's default
    seed: int = 0                        # seeds the requests that set no seed (reproducible runs, as vLLM's
                                         # --seed); -1 = fresh entropy every run
    spec_method: str = "auto"            # auto | none | dflash | dspark (auto: see resolve_auto_spec)
    draft: str = ""                      # draft directory (DeepSpec format); a DeepSeek-V4 checkpoint that ships its
                                         # DSpark module drafts with it when this is unset
    num_draft_tokens: int = 0            # gamma: tokens drafted per step; 0 = the draft's block_size
    calibration_file: str = ""           # an sts.json (STS temperatures) instead of the one beside the draft, e.g. for
                                         # a read-only checkpoint; reload_calibration reads it again
    draft_vocab_size: int = 0            # tokens the draft may propose: 0 = its draft_vocab.json (all without one);
                                         # K = that file's K most frequent; -1 = the whole vocabulary
    verify_policy: str = ""              # full | fixed:k | threshold:c | sps | sps-lagged; "" = auto: the default
                                         # model's own draft DEFAULT_MODEL_VERIFY_POLICY, any other draft full
    sps_profile: str = ""                # SPS(B) cost table JSON; "" = profile quickly at start-up (cached); none
    calibration_window: int = 10000      # verified rounds the calibration monitor's ECE and survivals cover
    calibration_ece_threshold: float = 0.05  # a window's pooled ECE above this is drift (a warning and a gauge)
    log_spec_rounds: str = ""            # append each verified round's confidence logits and lengths (jsonl) here
    log_spec_rounds_max_mb: float = 64.0  # then rotate to PATH.1 (at most twice this is kept)
    device: str = "auto"                 # auto (cuda when present) | cpu | cuda
    kernels: str = "auto"                # auto (triton on cuda, torch twins on cpu) | torch | triton
    attention: str = "auto"              # the target's attention on the Triton path: auto (flashinfer where installed,
                                         # on cuda in bf16/fp16) | triton | flashinfer
    enforce_eager: bool = False          # no CUDA graphs (they are captured on cuda + triton otherwise)
    huge_pages: bool = True              # CPU: weights in 2 MB transparent huge pages (fewer TLB misses)
    tensor_parallel_size: int = 1        # ranks (processes) one engine spans; local ones are started by the engine,
                                         # other nodes' by torchrun (docs/parallelism.md). The KV budget is per rank.
    tensor_parallel_timeout: float = 60.0  # seconds a collective waits for another rank before the engine fails
    expert_parallel: bool = False        # DeepSeek-V4: whole routed experts per rank (E / N each) instead of every
                                         # expert split over the tensor-parallel ranks

    def __post_init__(self):
        if not self.model:
            self.model = str(DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME)
        if self.model.endswith(".gguf"):
            from engine.gguf_files import model_dir_for
            self.model = str(model_dir_for(self.model))
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_block_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefix_cache_states < 0:
            raise ValueError(f"prefix_cache_states must be >= 0 (0 = two per max_num_seqs), got "
                             f"{self.prefix_cache_states}")
        if self.tensor_parallel_timeout <= 0:
            raise ValueError(f"tensor_parallel_timeout must be > 0 seconds, got {self.tensor_parallel_timeout}")
        if self.expert_parallel and self.tensor_parallel_size == 1:
            raise ValueError("expert_parallel shards the experts over the tensor-parallel ranks: it needs "
                             "tensor_parallel_size > 1")
        if self.kv_cache_gb < 0:
            raise ValueError(f"kv_cache_gb must be >= 0 (0 = auto), got {self.kv_cache_gb}")
        if self.spec_method not in SPEC_METHODS:
            raise ValueError(f"spec_method must be one of {SPEC_METHODS}, got {self.spec_method!r}")
        default_draft = self.spec_method == "auto" and not self.draft
        if self.spec_method == "auto":
            self.spec_method, self.draft = resolve_auto_spec(self.model, self.draft, self.dtype)
        if not self.verify_policy:
            default_draft = default_draft and self.spec_method != "none"
            self.verify_policy = DEFAULT_MODEL_VERIFY_POLICY if default_draft else "full"
        if self.spec_method == "dspark" and not self.draft and ships_dspark(self.model):
            self.draft = self.model  # the module in the target's own checkpoint
        if self.spec_method != "none" and not self.draft:
            raise ValueError(f"spec_method={self.spec_method!r} needs a draft directory (draft=...)")
        if self.calibration_window < 1 or not 0 < self.calibration_ece_threshold < 1:
            raise ValueError(f"calibration_window must be >= 1 and calibration_ece_threshold in (0, 1), got "
                             f"{self.calibration_window} and {self.calibration_ece_threshold}")
        if self.num_draft_tokens < 0:
            raise ValueError(f"num_draft_tokens must be >= 0 (0 = the draft's block size), got {self.num_draft_tokens}")
        if self.draft_vocab_size < -1:
            raise ValueError(f"draft_vocab_size must be >= -1 (0 = the draft's own list, -1 = every token), "
                             f"got {self.draft_vocab_size}")
        parse_verify_policy(self.verify_policy)
        self.device, self.kernels = resolve_device(self.device, self.kernels)
        check_attention(self.attention, self.kernels)
        self.quantization = resolve_quantization(self.quantization, self.model, self.device,
                                                 self.tensor_parallel_size)
        for name in ("enforce_eager", "enable_prefix_caching", "huge_pages", "expert_parallel"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.kv_cache_gb == 0 and self.device == "cpu":
            self.kv_cache_gb = auto_kv_cache_gb()  # on a GPU the model runner sizes it after loading the weights
