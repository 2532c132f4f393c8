"""DeepSeek-V4's attention of one step for one sequence, in plain torch: the twin (the test oracle) of
kernels/triton_v4_attention.py, with the same signature.

Each query row sees a band of the window's K=V and its own list of compressed entries, indexed into the paged entries
buffer (FlashMLA's sparse layout: an index per query, -1 for none; an entry listed twice counts twice); one shared
K=V head (MQA with K == V) and a per-head sink logit whose probability mass is dropped."""
import torch


def v4_attention(q: torch.Tensor, window_kv: torch.Tensor, window: int, entries: torch.Tensor,
                 entry_index: torch.Tensor, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """q [S, H, D]: a sequence's newest S rows; window_kv [W, D]: the K=V of its positions up to the newest, row i
    sitting at W - S + i and seeing the last `window` of them up to itself; entries [E, D]: the paged entries buffer,
    of which row i also sees entries[entry_index[i, j]] for each entry_index[i, j] >= 0 ([S, J]); sinks [H]: each
    head's sink logit -> [S, H, D] in q's dtype."""
    check_v4_inputs(q, window_kv, window, entries, entry_index, sinks)
    S, D = q.shape[0], q.shape[2]
    W = window_kv.shape[0]
    last = W - S + torch.arange(S, device=q.device)[:, None]
    key = torch.arange(W, device=q.device)[None, :]
    in_window = (key <= last) & (key > last - window)
    chosen = entry_index >= 0
    gathered = entries[torch.where(chosen, entry_index, 0).long()] if entries.shape[0] else \
        window_kv.new_zeros(S, entry_index.shape[1], D)
    keys = torch.cat([window_kv.expand(S, W, D), gathered.to(window_kv.dtype)], 1)  # [S, W + J, D]
    logits = torch.einsum("shd,skd->hsk", q.to(keys.dtype), keys).float() * scale
    logits = logits.masked_fill(~torch.cat([in_window, chosen], 1), float("-inf"))
    sink = sinks.float().view(-1, 1, 1).expand(-1, S, 1)
    probs = torch.cat([logits, sink], -1).softmax(-1)[..., :-1]
    return torch.einsum("hsk,skd->shd", probs.to(keys.dtype), keys).to(q.dtype)


def check_v4_inputs(q, window_kv, window, entries, entry_index, sinks):
    """Shape checks that need no host sync (an index past the entries buffer is not caught: it would cost one)."""
    if q.dim() != 3 or window_kv.dim() != 2 or entries.dim() != 2:
        raise ValueError(f"v4_attention: q {tuple(q.shape)} must be [S, H, D], window_kv {tuple(window_kv.shape)} "
                         f"and entries {tuple(entries.shape)} [rows, D]")
    S, H, D = q.shape
    if window_kv.shape[1] != D or entries.shape[1] != D:
        raise ValueError(f"v4_attention: head_dim must match: q {tuple(q.shape)}, window_kv "
                         f"{tuple(window_kv.shape)}, entries {tuple(entries.shape)}")
    if window_kv.shape[0] < S:
        raise ValueError(f"v4_attention: window_kv has {window_kv.shape[0]} rows, fewer than the {S} query rows "
                         "(it must end with their own K=V)")
    if window < 1:
        raise ValueError(f"v4_attention: window must be >= 1, got {window}")
    if entry_index.dim() != 2 or entry_index.shape[0] != S or entry_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"v4_attention: entry_index {tuple(entry_index.shape)} {entry_index.dtype} must be "
                         f"[{S}, J] int32/int64")
    if sinks.shape != (H,):
        raise ValueError(f"v4_attention: sinks {tuple(sinks.shape)} must be [{H}] (one per head)")
