"""One flat config per training run (a JSON file under train/configs/, overridable from the CLI)."""
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from engine.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR


@dataclass
class TrainConfig:
    # what to train
    method: str = "dspark"                   # dspark (Markov + confidence heads) | dflash (backbone only, CE loss)
    target: str = str(DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME)
    num_layers: int = 2
    block_size: int = 7
    markov_rank: int = 32                    # ignored (0) for dflash
    markov_head_type: str = "vanilla"
    target_layer_ids: list[int] = field(default_factory=list)  # empty = spread over the target
    init_from_target: bool = True            # draft layers start as copies of the target's last layers
    init_from: str = ""                      # or: a draft directory whose weights start the run (same shape)
    draft_vocab: str = ""                    # a draft_vocab.json: train over the tokens the draft will propose
    # data
    data: str = "data/sharegpt_smollm2.jsonl"
    features_dir: str = "data/features"      # target hidden states cached once per conversation
    min_loss_tokens: int = 14
    num_anchors: int = 48                    # sampled per conversation and epoch
    # loss (DeepSpec defaults; dflash forces ce=1, l1=0, conf=0)
    ce_alpha: float = 0.1
    l1_alpha: float = 0.9
    confidence_alpha: float = 1.0
    loss_decay_gamma: float = 4.0
    # optimisation
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = False                       # bf16 autocast for the forward/backward (fp32 master weights)
    batch_size: int = 8                      # conversations per optimiser step (over all ranks)
    epochs: int = 10
    max_steps: int = 0                       # 0 = epochs * conversations / batch_size
    max_minutes: float = 0.0                 # 0 = no wall-clock limit; else stop (and save) after this long
    seed: int = 42
    num_threads: int = 0                     # 0 = torch's default
    device: str = "cpu"                      # cpu | cuda (train/gpu_leg.py): the draft, the features and the steps
    # output
    out: str = "runs/dspark"                 # checkpoints (resume) and the exported draft under out/draft
    checkpoint_every: int = 50
    log_every: int = 5

    def __post_init__(self):
        if self.method not in ("dspark", "dflash"):
            raise ValueError(f"method must be 'dspark' or 'dflash', got {self.method!r}")
        if self.method == "dflash":
            self.markov_rank, self.ce_alpha, self.l1_alpha, self.confidence_alpha = 0, 1.0, 0.0, 0.0
        elif self.markov_rank <= 0:
            raise ValueError("a dspark draft needs markov_rank > 0")
        for name in ("block_size", "num_layers", "num_anchors", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> "TrainConfig":
        values = json.loads(Path(path).read_text()) if path else {}
        known = {f.name for f in fields(cls)}
        unknown = (set(values) | set(overrides)) - known
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}")
        return cls(**(values | {k: v for k, v in overrides.items() if v is not None}))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"
