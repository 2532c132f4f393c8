"""The engine's Triton path end to end: the same requests through kernels='triton' (on CPU: Triton's interpreter;
on a GPU: CUDA) and through the torch twins on CPU give the same tokens, plain and speculative, greedy and seeded."""
import json

import pytest
import torch
from tiny_models import save_tiny_draft

from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kernels import triton_attention, triton_budget, triton_kv, triton_markov, triton_rejection

PROMPTS = [[1, 17, 33, 9, 250, 4], [1, 5] * 11, [1, 99]]
SETTINGS = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=10, temperature=0.9, seed=11, ignore_eos=True),
            SamplingParams(max_tokens=10, temperature=0.7, seed=3, ignore_eos=True)]
CONFIGS = {"plain": ("none", "full"), "dspark-full": ("dspark", "full"),
           "dspark-sps-lagged": ("dspark", "sps-lagged"), "dflash": ("dflash", "full"),
           "dspark-vocab": ("dspark-vocab", "full")}  # a draft vocabulary (FR-Spec) of 150 shuffled ids


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("triton_drafts")
    profile = root / "sps.json"  # cheap up to ~2 drafts per request, then steep: sps-lagged cuts blocks
    profile.write_text(json.dumps({"step_cost_s": {"1": 1.0, "9": 1.0, "30": 10.0}}))
    vocab = save_tiny_draft(root / "dspark-vocab", tiny_llama_dir, block_size=4, mask_token_id=5, seed=1)
    ids = torch.randperm(320, generator=torch.Generator().manual_seed(0))[:150].tolist()
    (vocab / "draft_vocab.json").write_text(json.dumps({"token_ids": ids}))
    return {"dspark": save_tiny_draft(root / "dspark", tiny_llama_dir, block_size=4, mask_token_id=5),
            "dflash": save_tiny_draft(root / "dflash", tiny_llama_dir, rank=0, confidence=False, block_size=4,
                                      mask_token_id=5),
            "dspark-vocab": vocab, "profile": profile}


def generate(target, drafts, config: str, **options) -> list[list[int]]:
    method, policy = CONFIGS[config]
    draft = str(drafts.get(method, ""))
    llm = LLM(model=str(target), dtype="float32", spec_method=method.split("-")[0], draft=draft, verify_policy=policy,
              sps_profile=str(drafts["profile"]), kv_cache_gb=0.02, kv_block_size=8, **options)
    return [c.token_ids for c in llm.generate(PROMPTS, SETTINGS, use_tqdm=False)]


def spy(monkeypatch, module, name: str, calls: dict):
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_triton_path_gives_the_torch_path_tokens(tiny_llama_dir, drafts, config, monkeypatch):
    expected = generate(tiny_llama_dir, drafts, config, device="cpu", kernels="torch")
    calls = {}
    for module, name in [(triton_attention, "varlen_paged_attention"), (triton_attention, "block_attention"),
                         (triton_kv, "store_kvcache"), (triton_rejection, "rejection_sample"),
                         (triton_markov, "markov_sample"), (triton_budget, "allocate_budget")]:
        spy(monkeypatch, module, name, calls)
    got = generate(tiny_llama_dir, drafts, config, kernels="triton")
    assert got == expected
    used = {"varlen_paged_attention", "store_kvcache"}
    if config != "plain":
        used |= {"block_attention", "rejection_sample"}
    if config.startswith("dspark"):
        used |= {"markov_sample"}
    if config == "dspark-sps-lagged":
        used |= {"allocate_budget"}
    assert used <= set(calls), f"the Triton path did not run: {sorted(used - set(calls))} never called"


def test_token_comparison_can_fail(tiny_llama_dir, drafts):
    """Negative control: a different seed for the sampled requests changes the tokens the comparison sees."""
    expected = generate(tiny_llama_dir, drafts, "dspark-full", device="cpu", kernels="torch")
    SETTINGS[1].seed += 1
    try:
        got = generate(tiny_llama_dir, drafts, "dspark-full", device="cpu", kernels="torch")
    finally:
        SETTINGS[1].seed -= 1
    assert got[0] == expected[0] and got[1] != expected[1]


def test_device_and_kernel_options_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="device must be one of"):
        EngineConfig(device="tpu")
    with pytest.raises(ValueError, match="kernels must be one of"):
        EngineConfig(kernels="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            EngineConfig(device="cuda")
        monkeypatch.setattr("kernels.triton_support.INTERPRETING", False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            EngineConfig(device="cpu", kernels="triton")
    assert EngineConfig(device="cpu").kernels == "torch"
