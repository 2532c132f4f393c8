"""Bad input raises an exception whose message names the problem."""
import json
import shutil

import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.outputs import RequestError


def test_unknown_architecture(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown architecture 'MambaForCausalLM'"):
        LLM(model=str(bad))


def test_missing_directory_and_files(tiny_llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(model=str(tmp_path / "nowhere"))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_llama_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        LLM(model=str(no_weights))
    (no_weights / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        LLM(model=str(no_weights))


def test_missing_shard(tiny_llama_dir, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_llama_dir, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        LLM(model=str(sharded))


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), dtype="float32", kv_cache_gb=0.00015, kv_block_size=4)  # ~200 tokens


def test_prompt_longer_than_context(llm):
    with pytest.raises(ValueError, match="context length is 512"):
        llm.generate([[5] * 600], use_tqdm=False)


def test_request_larger_than_kv_cache(llm):
    with pytest.raises(ValueError, match="KV blocks but the cache has only"):
        llm.generate([[5] * 100], SamplingParams(max_tokens=400), use_tqdm=False)


def test_bad_prompts(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(ValueError, match="token ids must be in"):
        llm.generate([[5, 100000]], use_tqdm=False)
    assert not llm.has_unfinished(), "a rejected request must not stay queued"


@pytest.mark.parametrize("prompt,max_tokens,field", [([], 4, "prompt"), ([5, 100000], 4, "prompt"),
                                                      ([5] * 600, 4, "prompt"), ([5] * 100, 400, "max_tokens")])
def test_refusals_name_the_field(llm, prompt, max_tokens, field):
    """The engine's refusals are RequestErrors naming the input to change (the server's OpenAI `param`)."""
    with pytest.raises(RequestError) as refusal:
        llm.add_request(prompt, SamplingParams(max_tokens=max_tokens))
    assert refusal.value.field == field
    assert not llm.has_unfinished()


@pytest.mark.parametrize("field,value", [("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5),
                                         ("max_tokens", 0), ("top_k", -2), ("min_p", 1.5), ("seed", -1),
                                         ("seed", 2**63)])
def test_invalid_sampling_params(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_bad_engine_options():
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM(modle="x")
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int3")
    with pytest.raises(ValueError, match="kv_cache_gb"):
        EngineConfig(kv_cache_gb=-1)
    assert 0.5 <= EngineConfig().kv_cache_gb <= 8
