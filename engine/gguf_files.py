"""A model directory for a GGUF file (`--model FILE.gguf`): config.json, generation_config.json and the tokenizer
converted from the file's metadata once (cached under $DSPARK_MODELS_DIR/.gguf/), beside a link to the file, whose
weights the loader reads (engine/models/gguf.py). The rest of the engine then sees an ordinary model directory."""
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from engine.config import DEFAULT_MODELS_DIR

MARKER = ".complete"


def write_json(path: Path, obj: dict):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def save_tokenizer(gguf_path: Path, out_dir: Path, config: dict, pre: str):
    """The file's tokenizer and chat template through transformers' GGUF conversion, saved as tokenizer.json."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory() as alone:  # transformers would prefer tokenizer files beside the GGUF
        (Path(alone) / gguf_path.name).symlink_to(gguf_path.resolve())
        tok = AutoTokenizer.from_pretrained(alone, gguf_file=gguf_path.name)
    if pre == "smollm":  # llama.cpp's "smollm" pre-tokenizer splits digits one by one before GPT-2's byte-level split
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.model_max_length = config["max_position_embeddings"]
    if tok.eos_token_id != config["eos_token_id"] or not tok.chat_template:
        raise ValueError(f"tokenizer from {gguf_path}: eos {tok.eos_token!r}/{tok.eos_token_id} (the file says "
                         f"{config['eos_token_id']}), chat template set: {bool(tok.chat_template)}")
    tok.save_pretrained(out_dir)


def write_model_files(gguf_path: Path, out_dir: Path, sampling_defaults: dict | None = None) -> dict:
    """config.json, generation_config.json and the tokenizer of this GGUF into out_dir; returns the config."""
    from gguf import GGUFReader

    from engine.models.gguf import field, read_config
    reader = GGUFReader(gguf_path)
    config = read_config(reader)
    write_json(out_dir / "config.json", config)
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    write_json(out_dir / "generation_config.json", ids | (sampling_defaults or {}))
    save_tokenizer(gguf_path, out_dir, config, field(reader, "tokenizer.ggml.pre", ""))
    return config


def cache_dir_for(gguf_path: Path, models_dir: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return models_dir / ".gguf" / f"{gguf_path.stem}-{key}"


def model_dir_for(gguf: str | Path, models_dir: Path = DEFAULT_MODELS_DIR) -> Path:
    """The cached model directory of this GGUF file, made on first use."""
    gguf_path = Path(gguf).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    out_dir = cache_dir_for(gguf_path, Path(models_dir))
    if (out_dir / MARKER).is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_model_files(gguf_path, tmp)
        (tmp / gguf_path.name).symlink_to(gguf_path)
        (tmp / MARKER).write_text(f"from {gguf_path}\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
