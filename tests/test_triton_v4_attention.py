"""DeepSeek-V4's attention kernel (kernels/triton_v4_attention.py) against its torch twin and against the engine's
own sink_attention over the same keys gathered densely, on odd sizes: a window band cut short by `window`, entries
picked by index from a paged buffer with -1 gaps (CSA's top-k), every finished entry (HCA), none (window-only),
head_dim 512 over two head tiles. Then the engine's V4 path with kernels='triton' (the kernel gathering top-k entries
from the pages) against its torch path, step by step through verify rounds and rollbacks. Negative controls: a
dropped sink, a dropped entry, a window one wider, an index off by one."""
import pytest
import torch
from tiny_models import save_tiny_v4

from engine import LLM
from engine.models.deepseek_v4.attention import V4Attention, sink_attention
from engine.models.deepseek_v4.model import V4Model
from kernels import triton_support
from kernels import triton_v4_attention as kernel
from kernels import v4_attention as twin

TOLERANCE = {torch.float32: (1e-5, 0.0), torch.bfloat16: (1e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}  # atol, rtol
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(rows: int, heads: int, head_dim: int, window_rows: int, window: int, num_entries: int, chosen: list,
                dtype: torch.dtype, device, seed: int = 0) -> dict:
    """chosen[i]: row i's entry indices (distinct), padded with -1 to a common width and shuffled among them."""
    gen = torch.Generator().manual_seed(seed)
    width = max(map(len, chosen))
    index = torch.full((rows, width), -1, dtype=torch.int32)
    for i, picks in enumerate(chosen):
        index[i, torch.randperm(width, generator=gen)[:len(picks)]] = torch.tensor(picks, dtype=torch.int32)
    return dict(q=torch.randn(rows, heads, head_dim, generator=gen).to(dtype).to(device),
                window_kv=torch.randn(window_rows, head_dim, generator=gen).to(dtype).to(device), window=window,
                entries=torch.randn(num_entries, head_dim, generator=gen).to(dtype).to(device),
                entry_index=index.to(device), sinks=(torch.randn(heads, generator=gen) + 1.0).to(device),
                scale=head_dim ** -0.5)


def csa_like(dtype, device, head_dim=40, heads=5):
    """3 rows, a 9-row window cut to 4, 23 paged entries of which each row sees a few (one row none)."""
    return make_inputs(3, heads, head_dim, 9, 4, 23, [[17, 2, 9], [], [22, 0, 5, 13, 8]], dtype, device)


def on_cpu_fp32(inputs: dict) -> dict:
    return {k: (v.cpu().float() if v.is_floating_point() else v.cpu()) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}


def dense_oracle(q, window_kv, window, entries, entry_index, sinks, scale) -> torch.Tensor:
    """The engine's sink_attention over the window and the whole entries buffer, a mask saying what each row sees."""
    rows, window_rows = q.shape[0], window_kv.shape[0]
    gap = (window_rows - rows + torch.arange(rows))[:, None] - torch.arange(window_rows)[None, :]
    in_window = (gap >= 0) & (gap < window)
    picked = torch.zeros(rows, entries.shape[0] + 1, dtype=torch.bool)
    picked.scatter_(1, torch.where(entry_index >= 0, entry_index, entries.shape[0]).long(), True)
    allowed = torch.cat([in_window, picked[:, :-1]], 1)
    return sink_attention(q, torch.cat([window_kv, entries]), allowed, sinks, scale)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    assert out.dtype == dtype
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.cpu().float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_top_k_entries_match_twin_and_sink_attention(kernel_device, dtype):
    inputs = csa_like(dtype, kernel_device)
    out = kernel.v4_attention(**inputs)
    reference = on_cpu_fp32(inputs)
    assert_close(out, twin.v4_attention(**reference), dtype)
    assert_close(out, dense_oracle(**reference), dtype)


def test_head_dim_512_over_two_head_tiles(kernel_device):
    """V4's real head size; 17 heads span two 16-head tiles (the last one mostly padding)."""
    inputs = make_inputs(2, 17, 512, 5, 128, 7, [[6, 1], [3]], torch.bfloat16, kernel_device, seed=1)
    out = kernel.v4_attention(**inputs)
    assert_close(out, dense_oracle(**on_cpu_fp32(inputs)), torch.bfloat16)


def test_every_finished_entry_and_window_only(kernel_device):
    """HCA: row i sees the first i + 2 entries, or every row the same entries through one index row broadcast with
    stride 0; window-only: no entries at all, and a window longer than the rows' history."""
    hca = make_inputs(4, 3, 24, 6, 3, 9, [list(range(i + 2)) for i in range(4)], torch.float32, kernel_device, seed=2)
    shared_row = torch.tensor([7, -1, 2, 4], dtype=torch.int32, device=kernel_device).expand(4, 4)
    assert shared_row.stride() == (0, 1)
    window_only = {**make_inputs(5, 3, 24, 6, 128, 0, [[]] * 5, torch.float32, kernel_device, seed=3),
                   "entry_index": torch.zeros(5, 0, dtype=torch.int32, device=kernel_device)}
    for inputs in (hca, hca | {"entry_index": shared_row}, window_only):
        out = kernel.v4_attention(**inputs)
        assert_close(out, dense_oracle(**on_cpu_fp32(inputs)), torch.float32)


def test_comparison_can_fail(kernel_device):
    """Negative controls: the oracle without the sink, with one entry fewer, with a window one wider, or with an
    index shifted by one row of the buffer differs from the kernel beyond the tolerance."""
    inputs = csa_like(torch.float32, kernel_device)
    out = kernel.v4_attention(**inputs).cpu()
    right = on_cpu_fp32(inputs)
    fewer = right["entry_index"].clone()
    fewer[0, fewer[0] == 9] = -1
    shifted = torch.where(right["entry_index"] >= 0, (right["entry_index"] + 1) % 23, -1)
    wrongs = [{"sinks": torch.full_like(right["sinks"], float("-inf"))}, {"entry_index": fewer},
              {"window": right["window"] + 1}, {"entry_index": shifted}]
    for wrong in wrongs:
        assert not torch.allclose(out, dense_oracle(**right | wrong), atol=1e-3)


def test_bad_inputs_name_the_problem(kernel_device):
    inputs = csa_like(torch.float32, kernel_device)
    with pytest.raises(ValueError, match="head_dim must match"):
        kernel.v4_attention(**inputs | {"entries": inputs["entries"][:, :8]})
    with pytest.raises(ValueError, match="fewer than the 3 query rows"):
        kernel.v4_attention(**inputs | {"window_kv": inputs["window_kv"][:2]})
    with pytest.raises(ValueError, match="entry_index"):
        kernel.v4_attention(**inputs | {"entry_index": inputs["entry_index"].float()})
    with pytest.raises(ValueError, match="one per head"):
        kernel.v4_attention(**inputs | {"sinks": inputs["sinks"][:2]})
    with pytest.raises(ValueError, match="window must be"):
        kernel.v4_attention(**inputs | {"window": 0})


def rows_inputs(dtype, device, head_dim=40, heads=5) -> dict:
    """Three sequences' rows over flattened rings of 12 rows each (the last ring scratch): sequence b's rows sit at
    positions starts[b].. and see the last 5 positions up to their own (none before 0), and a few paged entries."""
    gen = torch.Generator().manual_seed(4)
    capacity, window, starts, lengths = 12, 5, [0, 9, 3], [2, 3, 1]
    ring_row = torch.tensor([b for b, n in enumerate(lengths) for _ in range(n)] + [3])  # a padding row: scratch
    positions = torch.tensor([s + i for s, n in zip(starts, lengths) for i in range(n)] + [0])
    span = positions[:, None] + torch.arange(1 - window, 1)
    window_index = torch.where(span >= 0, ring_row[:, None] * capacity + span % capacity, -1)
    chosen = [[17, 2], [], [22, 0, 5], [9], [4, 11], [1], []]
    entry_index = torch.full((7, 3), -1, dtype=torch.int32)
    for i, picks in enumerate(chosen):
        entry_index[i, :len(picks)] = torch.tensor(picks, dtype=torch.int32)
    return dict(q=torch.randn(7, heads, head_dim, generator=gen).to(dtype).to(device),
                window_keys=torch.randn(4 * capacity, head_dim, generator=gen).to(dtype).to(device),
                window_index=window_index.to(device), entries=torch.randn(23, head_dim, generator=gen).to(dtype)
                .to(device), entry_index=entry_index.to(device),
                sinks=(torch.randn(heads, generator=gen) + 1.0).to(device), scale=head_dim ** -0.5)


def rows_oracle(q, window_keys, window_index, entries, entry_index, sinks, scale) -> torch.Tensor:
    """Row by row, the engine's sink_attention over exactly the keys its two index lists name."""
    out = []
    for i in range(q.shape[0]):
        keys = torch.cat([window_keys[window_index[i][window_index[i] >= 0].long()],
                          entries[entry_index[i][entry_index[i] >= 0].long()]])
        allowed = torch.ones(1, keys.shape[0], dtype=torch.bool)
        out.append(sink_attention(q[i:i + 1], keys, allowed, sinks, scale))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_kernel_and_twin_match_row_by_row_attention(kernel_device, dtype):
    inputs = rows_inputs(dtype, kernel_device)
    ref = rows_oracle(**on_cpu_fp32(inputs))
    assert_close(kernel.v4_rows_attention(**inputs), ref, dtype)
    assert_close(twin.v4_rows_attention(**on_cpu_fp32(inputs)), ref, torch.float32)


def test_rows_comparison_can_fail(kernel_device):
    """Negative control: the window read one ring row off gives other outputs."""
    inputs = rows_inputs(torch.float32, kernel_device)
    ref = rows_oracle(**on_cpu_fp32(inputs))
    shifted = inputs | {"window_index": torch.where(inputs["window_index"] >= 0, inputs["window_index"] + 1, -1)}
    assert (kernel.v4_rows_attention(**shifted).cpu() - ref).abs().max() > 0.05


# The engine's V4 path: kernels='triton' against kernels='torch', logits of every step.
DRAFTS = 6
ENGINE_TOLERANCE = 2e-5  # fp32 logits of magnitude ~3 (as tests/test_v4_model.py): only summation order differs


@pytest.fixture(scope="module")
def tiny_v4_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4") / "tiny-v4"
    save_tiny_v4(path, seed=3)
    return path


def step(llm: LLM, drafts: list[int]) -> torch.Tensor:
    (seq,) = llm.scheduler.running or llm.scheduler.waiting
    seq.spec_token_ids = drafts
    logits, _ = llm.model_runner.forward(llm.scheduler.schedule(), [1 + len(drafts)])
    seq.advance()
    return logits[0]


@torch.no_grad()
def worst_gap(path, monkeypatch, rounds: int = 5) -> float:
    """A 13-token prefill, then verify rounds of random drafts of which a random prefix is kept (the rest rolled
    back), through both engines in lockstep; the largest gap between their logits."""
    monkeypatch.setattr(triton_support, "_use_triton", False)  # restored after the test: LLM sets it globally
    monkeypatch.setattr(V4Model, "eager_rows_from", 1)  # the verify steps in fixed shapes, as in a CUDA graph
    engines = [LLM(model=str(path), dtype="float32", kv_cache_gb=0.02, kv_block_size=8, enable_prefix_caching=False,
                   num_draft_tokens=DRAFTS, kernels=kernels, enforce_eager=True)  # the attention, not CUDA graphs
               for kernels in ("torch", "triton")]
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(2, 320, (13,), generator=g).tolist()
    gaps = []
    for llm in engines:
        llm.add_request(prompt)
    drafts, accepted = [], 0
    for _ in range(rounds + 1):
        logits = []
        for llm, kernels in zip(engines, ("torch", "triton")):
            triton_support.select(kernels)
            logits.append(step(llm, drafts)[:accepted + 1])
            seq = llm.scheduler.running[0]
            llm.block_manager.rollback(seq, len(drafts) - accepted)
            seq.spec_token_ids = []
            seq.token_ids += drafts[:accepted] + [logits[0][-1].argmax().item()]
        gaps.append((logits[1] - logits[0]).abs().max().item())
        drafts = torch.randint(2, 320, (DRAFTS,), generator=g).tolist()
        accepted = torch.randint(0, DRAFTS + 1, (1,), generator=g).item()
    return max(gaps)


def test_engine_triton_path_equals_torch_path(tiny_v4_dir, monkeypatch):
    """The prefill steps one sequence at a time (v4_attention), the verify steps in fixed shapes
    (v4_rows_attention): both kernels run, with entries from the pages among them."""
    calls = {"v4_attention": [], "v4_rows_attention": []}
    for name, entry_index in (("v4_attention", 4), ("v4_rows_attention", 4)):
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *args, real=real, name=name, i=entry_index:
                            calls[name].append(args[i].shape) or real(*args))
    assert worst_gap(tiny_v4_dir, monkeypatch) < ENGINE_TOLERANCE
    assert all(any(shape[1] > 0 for shape in shapes) for shapes in calls.values())


def test_engine_comparison_can_fail(tiny_v4_dir, monkeypatch):
    """Negative control: each row's last indexed entry dropped on the kernel path shows in the logits."""
    real, real_rows = V4Attention.entry_index, V4Attention.rows_entries

    def one_fewer(self, *args):
        index = real(self, *args)
        return index[:, :-1] if self.kind == "csa" and triton_support.enabled() else index

    def one_fewer_rows(self, *args):
        entries, index = real_rows(self, *args)
        return entries, index[:, :-1] if self.kind == "csa" and triton_support.enabled() else index
    monkeypatch.setattr(V4Attention, "entry_index", one_fewer)
    monkeypatch.setattr(V4Attention, "rows_entries", one_fewer_rows)
    assert worst_gap(tiny_v4_dir, monkeypatch) > 100 * ENGINE_TOLERANCE
