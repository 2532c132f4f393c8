"""Weights in transparent huge pages (engine/cpu.py): values, ties and sharing kept, memory marked for
2 MB pages, and the same tokens as plain memory."""
import mmap
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from engine import LLM, SamplingParams
from engine.cpu import (
    ALIGN,
    huge_page_buffer,
    huge_pages_available,
    keep_freed_memory,
    move_to_huge_pages,
    return_freed_memory,
)

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """'always', 'madvise' or 'never' ('' where the kernel has no transparent huge pages)."""
    text = THP_MODE.read_text() if THP_MODE.is_file() else ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def thp_eligible(address: int) -> bool:
    """Whether the mapping holding this address may get huge pages, from /proc/self/smaps."""
    eligible, inside = None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("THPeligible:"):
            eligible = line.split()[1] == "1"
    assert eligible is not None, f"no mapping with THPeligible holds {address:#x}"
    return eligible


needs_madvise_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or not huge_pages_available()
                                       or thp_mode() not in ("madvise", "always"),
                                       reason="transparent huge pages off or absent here")


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(300, 48)
        self.proj = nn.Linear(48, 80)
        self.head = nn.Linear(48, 300, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("table", torch.arange(1000, dtype=torch.float32))


def test_move_keeps_values_ties_and_shared_parameters():
    model, other = Tied(), nn.Module()
    other.shared = model.proj  # a second module holding the same submodule, as a draft holds the target's head
    before = {name: t.clone() for name, t in model.state_dict().items()}
    total = move_to_huge_pages(model, other)
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert model.head.weight is model.embed.weight and other.shared.weight.data_ptr() == model.proj.weight.data_ptr()
    ptrs = sorted({t.data_ptr() for t in model.state_dict().values()})
    assert len(ptrs) == 4  # embed (= head), proj weight and bias, table
    assert all(p % ALIGN == 0 for p in ptrs) and ptrs[-1] - ptrs[0] < total
    assert total == sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN
                        for t in (model.embed.weight, model.proj.weight, model.proj.bias, model.table))
    x = torch.randint(0, 300, (7,))
    torch.testing.assert_close(model.head(model.embed(x)), before["embed.weight"][x] @ before["embed.weight"].T)


def resident_bytes() -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmRSS:")).split()[1]) * 1024


def test_old_copies_of_moved_weights_leave_memory():
    """The engine keeps freed heap memory (keep_freed_memory), so the weights' old copies stayed resident after the
    move (+256 MB for SmolLM2) until return_freed_memory hands them back."""
    if not sys.platform.startswith("linux") or not keep_freed_memory():  # as every engine sets it
        pytest.skip("glibc on Linux only")
    size = 96 << 20

    def moved_growth(give_back: bool) -> int:
        model = nn.ParameterList(nn.Parameter(torch.ones(size // 4 // 4), requires_grad=False) for _ in range(4))
        before = resident_bytes()
        move_to_huge_pages(model)
        if give_back:
            return_freed_memory()
        growth = resident_bytes() - before
        del model
        return_freed_memory()
        return growth
    assert moved_growth(give_back=False) > 0.7 * size  # negative control: the old copies are still resident
    assert moved_growth(give_back=True) < 0.3 * size


@needs_madvise_thp
def test_buffer_is_marked_for_huge_pages():
    buffer = huge_page_buffer(8 << 20)
    assert buffer.data_ptr() % (2 << 20) == 0 and buffer.numel() == 8 << 20 and not buffer.any()
    assert thp_eligible(buffer.data_ptr())
    if thp_mode() == "madvise":  # negative control: a fresh mapping is not marked (every mapping is under 'always');
        # a fresh mmap, not torch.empty, whose malloc may reuse heap that earlier tests' weights marked
        plain_map = mmap.mmap(-1, 8 << 20)
        plain = torch.frombuffer(plain_map, dtype=torch.uint8)
        assert not thp_eligible(plain.data_ptr())
        del plain


@needs_madvise_thp
def test_engine_tokens_do_not_depend_on_huge_pages(tiny_llama_dir):
    prompts = [[5, 6, 7, 8], list(range(20, 61))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = {}
    for huge in (True, False):
        llm = LLM(model=str(tiny_llama_dir), dtype="bfloat16", kv_cache_gb=0.01, huge_pages=huge)
        runner = llm.model_runner
        assert thp_eligible(runner.model.layers[0].mlp.down_proj.weight.data_ptr()) == huge or thp_mode() == "always"
        outputs[huge] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs[True] == outputs[False]
