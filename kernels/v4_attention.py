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
    keys = torch.cat([window_kv.expand(S, W, D), gather_rows(entries, entry_index).to(window_kv.dtype)], 1)
    return attend(q, keys, torch.cat([in_window, entry_index >= 0], 1), sinks, scale)


def v4_rows_attention(q: torch.Tensor, window_keys: torch.Tensor, window_index: torch.Tensor, entries: torch.Tensor,
                      entry_index: torch.Tensor, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """The same attention for the rows of many sequences at once, every key by index: q [T, H, D]; row i sees
    window_keys[window_index[i, j]] ([T, W] into the flattened window rings) and entries[entry_index[i, j]]
    ([T, J] into the paged entries), -1 skipping -> [T, H, D] in q's dtype."""
    check_rows_inputs(q, window_keys, window_index, entries, entry_index, sinks)
    keys = torch.cat([gather_rows(window_keys, window_index), gather_rows(entries, entry_index)], 1)
    return attend(q, keys, torch.cat([window_index >= 0, entry_index >= 0], 1), sinks, scale)


def attend(q: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, sinks: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Each row's heads q [S, H, D] over its own keys = values [S, K, D] where allowed [S, K], a sink logit per head
    whose probability mass is dropped -> [S, H, D] in q's dtype."""
    logits = torch.einsum("shd,skd->hsk", q.to(keys.dtype), keys).float() * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    sink = sinks.float().view(-1, 1, 1).expand(-1, q.shape[0], 1)
    probs = torch.cat([logits, sink], -1).softmax(-1)[..., :-1]
    return torch.einsum("hsk,skd->shd", probs.to(keys.dtype), keys).to(q.dtype)


def gather_rows(buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """buffer[index] [S, K, D], rows of index -1 read as row 0 (masked by the caller); an empty buffer gives zeros."""
    if not buffer.shape[0]:
        return buffer.new_zeros(*index.shape, buffer.shape[1])
    return buffer[index.clamp_min(0).long()]


def check_v4_inputs(q, window_kv, window, entries, entry_index, sinks):
    """Shape checks that need no host sync (an index past the entries buffer is not caught: it would cost one)."""
    check_shapes("v4_attention", q, {"window_kv": window_kv, "entries": entries}, {"entry_index": entry_index},
                 sinks)
    if window_kv.shape[0] < q.shape[0]:
        raise ValueError(f"v4_attention: window_kv has {window_kv.shape[0]} rows, fewer than the {q.shape[0]} query "
                         "rows (it must end with their own K=V)")
    if window < 1:
        raise ValueError(f"v4_attention: window must be >= 1, got {window}")


def check_rows_inputs(q, window_keys, window_index, entries, entry_index, sinks):
    check_shapes("v4_rows_attention", q, {"window_keys": window_keys, "entries": entries},
                 {"window_index": window_index, "entry_index": entry_index}, sinks)


def check_shapes(kernel: str, q, buffers: dict, indexes: dict, sinks):
    """q [S, H, D]; each key buffer [rows, D]; each index [S, K] int32/int64; sinks [H]."""
    if q.dim() != 3 or any(b.dim() != 2 for b in buffers.values()):
        shapes = ", ".join(f"{name} {tuple(b.shape)}" for name, b in buffers.items())
        raise ValueError(f"{kernel}: q {tuple(q.shape)} must be [S, H, D] and {shapes} [rows, D]")
    S, H, D = q.shape
    if any(b.shape[1] != D for b in buffers.values()):
        shapes = ", ".join(f"{name} {tuple(b.shape)}" for name, b in buffers.items())
        raise ValueError(f"{kernel}: head_dim must match: q {tuple(q.shape)}, {shapes}")
    for name, index in indexes.items():
        if index.dim() != 2 or index.shape[0] != S or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{kernel}: {name} {tuple(index.shape)} {index.dtype} must be [{S}, J] int32/int64")
    if sinks.shape != (H,):
        raise ValueError(f"{kernel}: sinks {tuple(sinks.shape)} must be [{H}] (one per head)")
