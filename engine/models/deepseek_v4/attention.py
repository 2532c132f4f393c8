"""DeepSeek-V4's attention: low-rank Q (wq_a, q_norm, wq_b, a unit RMS norm per head), one shared K=V head (wkv,
kv_norm), partial interleaved rope, a causal sliding window, and on compressed layers the compressor's entries (each a
softmax-gated sum of `ratio` tokens' projections; CSA's windows overlap by one window and its Lightning indexer keeps
the top-k entries per query; HCA attends to every finished entry); a learned sink per head; the output's rope undone,
then the grouped low-rank output (wo_a per group, wo_b). Released names (vLLM's DeepSeek-V4 model code); the math
follows transformers 5.24's modeling_deepseek_v4.py: an entry w is visible to the query at position t once its window
has ended, w < (t + 1) // ratio.

The KV layout follows vLLM's DeepSeek-V4 blog (256-token logical blocks; the compressor state kept like a
sliding-window cache of 8 tokens for ratio 4, 128 for ratio 128): a compressed layer keeps its finished entries (and a
CSA layer its indexer's keys) in the engine's pages, one entry per `ratio` tokens; the block size is a multiple of
every ratio, so entry w of a sequence sits at its token slot of position w * ratio divided by the ratio. The window's
K=V and each compressor's raw projections (wkv | wgate) of the tokens its next entry pools live in per-request rings
(rings.py). An entry is written by the step that computes its window's last
token, from that step's projections and the ring's; a rolled-back entry is unread until its tokens are computed again,
which writes it anew.

With the prefix cache, a step also saves every ring's rows before each block end it crosses (Segment.saves), and a
request whose cached prefix ends at a block end starts from the rings saved there (V4Model.begin_step): every entry
before it is in the shared pages already."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.deepseek_v4.config import V4Config
from engine.models.deepseek_v4.mhc import unit_rms
from engine.models.deepseek_v4.rings import Ring
from engine.models.deepseek_v4.rope import cos_sin, inv_freq, rotate
from engine.models.deepseek_v4.step_rows import StepRows
from engine.models.layers import Linear
from kernels import dispatch, triton_support


@dataclass
class Segment:
    """One sequence's rows in a step: rows start..start+length of the flat batch are its last `length` positions,
    context_slots [L] are the cache slots of all its positions 0..L-1 (the new ones included), and request_slot
    indexes its per-request rings; each of saves (block end, state slot) keeps the rings' rows before that end (a
    restore from a saved state is the model's, before the step: V4Model.begin_step)."""
    start: int
    length: int
    context_slots: torch.Tensor
    request_slot: int = 0
    saves: tuple[tuple[int, int], ...] = ()

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.length)

    @property
    def end(self) -> int:
        return self.context_slots.shape[0]

    @property
    def first_position(self) -> int:
        return self.end - self.length


class V4Norm(nn.Module):
    """RMSNorm with an fp32 weight, applied in fp32 and cast back once."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * normed).to(x.dtype)


class Compressor(nn.Module):
    """Every `ratio` tokens -> one entry of size dim: softmax over the window's slots of gate + ape, per channel,
    weighting the tokens' projections; overlapping (CSA) windows also take the previous window's first half."""

    def __init__(self, hidden: int, dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.windows = 2 if overlap else 1  # the windows an entry pools from
        self.width = self.windows * dim
        self.wkv, self.wgate = Linear(hidden, self.width, bias=False), Linear(hidden, self.width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, self.width, dtype=torch.float32))
        self.norm = V4Norm(dim, eps)
        self.dim, self.ratio, self.overlap = dim, ratio, overlap
        # each token's wkv | wgate; a step starting at a block end reads the previous window's (overlap)
        self.ring = Ring(2 * self.width, self.windows * ratio, (self.windows - 1) * ratio)
        self.entries = None  # [slots // ratio, dim]: the paged entries

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.wkv(x), self.wgate(x)], -1)

    def update(self, seg: Segment, raw: torch.Tensor, freqs: torch.Tensor):
        """Write the entries whose window ends among seg's rows (raw: their projections) to the pages, pooling the
        ring's earlier tokens with them, then keep the rows in the ring."""
        r, s = self.ratio, seg.first_position
        first, last = s // r, seg.end // r  # the entries whose window's last token is in s..end-1
        if last > first:
            start = max(0, first - self.windows + 1) * r
            tokens = torch.cat([self.ring.read(seg.request_slot, start, s).to(raw.dtype), raw])[:last * r - start]
            pooled = self.pool(tokens, start // r, freqs)[first - start // r:]
            self.entries[seg.context_slots[first * r:last * r:r] // r] = pooled.to(self.entries.dtype)
        save_and_write(self.ring, seg, raw)

    def update_rows(self, rows: StepRows, positions: torch.Tensor, raw: torch.Tensor, freqs: torch.Tensor):
        """update for a fixed-shape step: the rows go to the ring first; every row then pools the span ending at it,
        and the rows that end a window write their entry (the others, and padding, write the scratch entry)."""
        r = self.ratio
        self.ring.put(rows.ring_row, positions, raw)
        index = self.ring.last_rows(rows.ring_row, positions, self.windows * r)
        tokens = self.ring.flat()[index.clamp_min(0)].to(raw.dtype)
        pooled = self.pool_rows(tokens, index >= 0, positions + 1 - r, freqs)
        ends_window = ((positions + 1) % r == 0) & rows.valid
        entry = ((positions + 1) // r - 1).clamp_min(0)
        page = rows.kv_slots[rows.seq, entry * r] // r
        self.entries[torch.where(ends_window, page, self.scratch)] = pooled.to(self.entries.dtype)

    def pool_rows(self, tokens: torch.Tensor, present: torch.Tensor, window_starts: torch.Tensor,
                  freqs: torch.Tensor) -> torch.Tensor:
        """pool of one window per row: tokens [T, windows * ratio, 2 * width], the positions before 0 absent
        (present [T, windows * ratio]) -> entries [T, dim], rope at window_starts [T]."""
        r, d = self.ratio, self.dim
        kv, gate = tokens[..., :self.width], tokens[..., self.width:] + self.ape.repeat(self.windows, 1)
        if self.overlap:  # the previous window's first halves, then this window's second halves
            kv = torch.cat([kv[:, :r, :d], kv[:, r:, d:]], 1)
            gate = torch.cat([gate[:, :r, :d], gate[:, r:, d:]], 1)
        kv = kv.masked_fill(~present[..., None], 0.0)
        gate = gate.masked_fill(~present[..., None], float("-inf"))
        pooled = (kv * gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)).sum(1)
        cos, sin = cos_sin(freqs, window_starts)
        return rotate(self.norm(pooled), cos, sin)

    @property
    def scratch(self) -> int:
        """The entries row a fixed-shape step's rows that end no window write to (never read)."""
        return self.entries.shape[0] - 1

    def pool(self, tokens: torch.Tensor, first_window: int, freqs: torch.Tensor) -> torch.Tensor:
        """Whole windows of projections [n * ratio, 2 * width] -> entries [n, dim], rope at each window's first
        position (the first entry lacks its previous window unless it is window 0: callers drop it)."""
        n = tokens.shape[0] // self.ratio
        raw = tokens.unflatten(0, (n, self.ratio))
        kv, gate = raw[..., :self.width], raw[..., self.width:] + self.ape
        if self.overlap:
            kv, gate = self.overlapped(kv, 0.0), self.overlapped(gate, float("-inf"))
        pooled = (kv * gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)).sum(1)
        cos, sin = cos_sin(freqs, (first_window + torch.arange(n, device=raw.device)) * self.ratio)
        return rotate(self.norm(pooled), cos, sin)

    def overlapped(self, t: torch.Tensor, fill: float) -> torch.Tensor:
        """[n, r, 2d] -> [n, 2r, d]: window w's slots are window w-1's first halves, then its own second halves."""
        n, r, d = t.shape[0], self.ratio, self.dim
        out = t.new_full((n, 2 * r, d), fill)
        out[:, r:] = t[..., d:]
        out[1:, :r] = t[:-1, :, :d]
        return out

    def finished(self, seg: Segment, dtype: torch.dtype) -> torch.Tensor:
        """The entries of seg's complete windows [end // ratio, dim], from the pages."""
        return self.entries[seg.context_slots[:seg.end // self.ratio * self.ratio:self.ratio] // self.ratio].to(dtype)


class Indexer(nn.Module):
    """The Lightning indexer: score(t, s) = sum_h w[t,h] * relu(q[t,h] . k[s]) / sqrt(d) over its own compressed
    keys; the top-k visible entries per query, ties to the earlier entry."""

    def __init__(self, config: V4Config, ratio: int):
        super().__init__()
        d, heads = config.index_head_dim, config.index_n_heads
        self.wq_b = Linear(config.q_lora_rank, heads * d, bias=False)
        self.weights_proj = Linear(config.hidden_size, heads, bias=False)
        self.compressor = Compressor(config.hidden_size, d, ratio, True, config.rms_norm_eps)
        self.heads, self.dim, self.top_k = heads, d, config.index_topk

    def select(self, x: torch.Tensor, q_low: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor:
        """A sequence's query rows -> [q, T] bool: the entries each attends to (visible says which have ended)."""
        chosen = torch.zeros_like(visible)
        chosen.scatter_(1, self.ranked(x, q_low, cos, sin, keys, visible), True)
        return chosen & visible

    def top_entries(self, x: torch.Tensor, q_low: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """select's entries as indices [q, min(top_k, T)], best first, -1 where a row has fewer visible."""
        order = self.ranked(x, q_low, cos, sin, keys, visible)
        return torch.where(visible.gather(1, order), order, -1)

    def ranked(self, x: torch.Tensor, q_low: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor:
        """[q, min(top_k, T)]: each row's best-scored entries, the ones not visible last (keys [T, d])."""
        if not keys.shape[0]:
            return visible.new_zeros(visible.shape[0], 0, dtype=torch.long)
        q, weights = self.queries(x, q_low, cos, sin)
        scores = F.relu(torch.einsum("shd,td->sht", q.float(), keys.float())) * self.dim ** -0.5
        return self.best((scores * weights.unsqueeze(-1)).sum(1).masked_fill(~visible, float("-inf")))

    def indexed_top(self, x: torch.Tensor, q_low: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """top_entries for rows whose keys come by index (a fixed-shape step): keys [E, d] the indexer's pages,
        index [q, J] each row's entries in them (-1: not visible) -> [q, min(top_k, J)] slots of index, -1 past a
        row's visible ones. Scored by kernels' indexer_scores: [q, J] scores, nothing [q, heads, J] or [q, J, d]."""
        if not index.shape[1]:
            return index.new_zeros(index.shape[0], 0)
        q, weights = self.queries(x, q_low, cos, sin)
        order = self.best(dispatch.indexer_scores(q, weights, keys, index, self.dim ** -0.5))
        return torch.where(index.gather(1, order) >= 0, order, -1)

    def queries(self, x: torch.Tensor, q_low: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' indexer queries [q, heads, d] (rotated) and their heads' weights [q, heads] (fp32)."""
        q = rotate(self.wq_b(q_low).unflatten(-1, (self.heads, self.dim)), cos, sin)
        return q, self.weights_proj(x).float() * self.heads ** -0.5

    def best(self, scores: torch.Tensor) -> torch.Tensor:
        """Each row's top_k slots by score; ties (every head's ReLU at zero) go to the earlier entry, whatever the
        entry count."""
        return stable_top_k(scores, self.top_k)


def stable_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The first min(k, J) indices of a stable descending sort of float32 scores [..., J] (ties to the earlier slot;
    -0.0 ties +0.0), by a top-k over unique int64 keys: the score's bits made order-preserving, then the reversed
    slot. Exactly the sort's answer, at a top-k's cost (3-4x less than the sort on CPU at 4k-16k slots)."""
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()
    slots = scores.shape[-1]
    keys = (ordered << 32) | (slots - 1 - torch.arange(slots, device=scores.device))
    return keys.topk(min(k, slots), dim=-1).indices


class V4Attention(nn.Module):
    def __init__(self, config: V4Config, layer: int):
        super().__init__()
        c, hidden, d = config, config.hidden_size, config.head_dim
        self.wq_a = Linear(hidden, c.q_lora_rank, bias=False)
        self.q_norm = V4Norm(c.q_lora_rank, c.rms_norm_eps)
        self.wq_b = Linear(c.q_lora_rank, c.num_heads * d, bias=False)
        self.wkv = Linear(hidden, d, bias=False)
        self.kv_norm = V4Norm(d, c.rms_norm_eps)
        self.wo_a = Linear(c.num_heads * d // c.o_groups, c.o_groups * c.o_lora_rank, bias=False)
        self.wo_b = Linear(c.o_groups * c.o_lora_rank, hidden, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(c.num_heads, dtype=torch.float32))
        self.kind, self.ratio = c.layer_kinds[layer], c.compress_ratios[layer]
        if self.kind != "window":
            self.compressor = Compressor(hidden, d, self.ratio, self.kind == "csa", c.rms_norm_eps)
        if self.kind == "csa":
            self.indexer = Indexer(c, self.ratio)
        self.make_rope(c)
        self.heads, self.dim, self.groups, self.window = c.num_heads, d, c.o_groups, c.sliding_window
        self.eps = c.rms_norm_eps
        self.ring = Ring(d, c.sliding_window, c.sliding_window - 1)  # the window's K=V after norm and rope

    def make_rope(self, c: V4Config):
        """The rope frequencies (not in the checkpoint: made again after a load on the meta device). A compressed
        layer's queries, keys, entries and indexer share the compress rope; a window-only layer has the plain one."""
        with torch.device("cpu"):
            freqs = (inv_freq(c.rope_head_dim, c.rope_theta) if self.kind == "window" else
                     inv_freq(c.rope_head_dim, c.compress_rope_theta, c.compress_rope_scaling))
        self.register_buffer("freqs", freqs, persistent=False)

    def caches(self) -> list[Compressor]:
        """The compressors whose entries this layer pages (its own, and its indexer's)."""
        return [m for m in (getattr(self, "compressor", None), getattr(getattr(self, "indexer", None),
                                                                        "compressor", None)) if m is not None]

    def rings(self) -> list[Ring]:
        return [self.ring] + [c.ring for c in self.caches()]

    def kv_bytes_per_token(self, dtype: torch.dtype) -> float:
        return sum(c.dim / c.ratio for c in self.caches()) * dtype.itemsize

    def allocate(self, num_slots: int, requests: int, rollback: int, dtype: torch.dtype, device: torch.device,
                 states: int = 0):
        for ring in self.rings():
            ring.allocate(requests, rollback, dtype, device, states)
        for c in self.caches():
            c.entries = torch.zeros(num_slots // c.ratio + 1, c.dim, dtype=dtype, device=device)  # + scratch

    def forward(self, x: torch.Tensor, positions: torch.Tensor, step: list[Segment] | StepRows) -> torch.Tensor:
        """x [N, hidden]: the step's rows of every sequence. Per sequence, the entries its rows finish go to the
        pages first; its rows then attend to its window (the ring's earlier K=V and the step's own) and its entries,
        and its new K=V joins the ring. A fixed-shape step (StepRows) does the same for all sequences at once."""
        if isinstance(step, StepRows):
            return self.forward_rows(x, positions, step)
        segments = step
        cos, sin = cos_sin(self.freqs, positions)
        q_low = self.q_norm(self.wq_a(x))
        q = rotate(unit_rms(self.wq_b(q_low).unflatten(-1, (self.heads, self.dim)), self.eps), cos, sin)
        kv = rotate(self.kv_norm(self.wkv(x)), cos, sin)
        raws = [c.project(x) for c in self.caches()]
        out = torch.empty_like(q)
        for seg in segments:
            rows = seg.rows
            for compressor, raw in zip(self.caches(), raws):
                compressor.update(seg, raw[rows], self.freqs)
            inputs = (seg, kv[rows], x[rows], q_low[rows], positions[rows], cos[rows], sin[rows])
            if triton_support.enabled():
                out[rows] = self.attend_paged(q[rows], *inputs)
            else:
                keys, allowed = self.context(*inputs)
                out[rows] = sink_attention(q[rows], keys, allowed, self.attn_sink, self.dim ** -0.5)
            save_and_write(self.ring, seg, kv[rows])
        return self.output(out, cos, sin)

    def forward_rows(self, x: torch.Tensor, positions: torch.Tensor, rows: StepRows) -> torch.Tensor:
        """forward over fixed shapes: the step's K=V and projections go to the rings first, then every row reads its
        window back from the ring and its entries from the pages by index (one attention call for the batch)."""
        cos, sin = cos_sin(self.freqs, positions)
        q_low = self.q_norm(self.wq_a(x))
        q = rotate(unit_rms(self.wq_b(q_low).unflatten(-1, (self.heads, self.dim)), self.eps), cos, sin)
        kv = rotate(self.kv_norm(self.wkv(x)), cos, sin)
        for compressor in self.caches():
            compressor.update_rows(rows, positions, compressor.project(x), self.freqs)
        self.ring.put(rows.ring_row, positions, kv)
        window_index = self.ring.last_rows(rows.ring_row, positions, self.window)
        entries, entry_index = self.rows_entries(rows, x, q_low, positions, cos, sin)
        out = dispatch.v4_rows_attention(q, self.ring.flat(), window_index, entries, entry_index, self.attn_sink,
                                         self.dim ** -0.5)
        return self.output(out, cos, sin)

    def rows_entries(self, rows: StepRows, x: torch.Tensor, q_low: torch.Tensor, positions: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the pages, each row's entries in them [T, J], -1 for none): entry_index's choice, for every row of a
        fixed-shape step (J: the widest sequence's windows, or the indexer's top-k)."""
        if self.kind == "window":
            return self.ring.flat()[:0], positions.new_zeros(positions.shape[0], 0)
        pages = rows.pages(self.ratio)
        entry = torch.arange(pages.shape[1], device=x.device)[None, :]
        visible = entry < ((positions + 1) // self.ratio)[:, None]
        if self.kind == "csa":
            entry = self.indexer.indexed_top(x, q_low, cos, sin, self.indexer.compressor.entries,
                                             torch.where(visible, pages, -1))
            pages, visible = pages.gather(1, entry.clamp_min(0)), entry >= 0
        return self.compressor.entries, torch.where(visible, pages, -1)

    def output(self, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention output [N, heads, D] -> [N, hidden]: the inverse rope, then the grouped low-rank projection."""
        grouped = rotate(out, cos, -sin).reshape(out.shape[0], self.groups, -1)
        return self.wo_b(self.wo_a.grouped(grouped, self.groups).flatten(1))

    def context(self, seg: Segment, kv: torch.Tensor, x: torch.Tensor, q_low: torch.Tensor, positions: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor):
        """A sequence's keys (its window's K=V, then the compressor's entries) and which each query row sees; kv, x,
        q_low, positions, cos and sin are its rows'."""
        s = seg.first_position
        back = min(s, self.window - 1)
        keys = torch.cat([self.ring.read(seg.request_slot, s - back, s).to(x.dtype), kv])
        gap = positions[:, None] - torch.arange(s - back, seg.end, device=x.device)[None, :]
        allowed = (gap >= 0) & (gap < self.window)
        if self.kind == "window":
            return keys, allowed
        entries = self.compressor.finished(seg, x.dtype)
        visible = torch.arange(entries.shape[0], device=x.device)[None, :] < ((positions + 1) // self.ratio)[:, None]
        if self.kind == "csa":
            index_keys = self.indexer.compressor.finished(seg, x.dtype)
            visible = self.indexer.select(x, q_low, cos, sin, index_keys, visible)
        return torch.cat([keys, entries]), torch.cat([allowed, visible], 1)

    def attend_paged(self, q: torch.Tensor, seg: Segment, kv: torch.Tensor, x: torch.Tensor, q_low: torch.Tensor,
                     positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """context's attention on the kernel path (kernels/triton_v4_attention.py): the window's K=V, and each row's
        entries as indices into the pages, read there by the kernel (neither gathered nor masked densely)."""
        s = seg.first_position
        window_kv = torch.cat([self.ring.read(seg.request_slot, s - min(s, self.window - 1), s).to(x.dtype), kv])
        if self.kind == "window":
            entries, index = window_kv[:0], positions.new_zeros(positions.shape[0], 0)
        else:
            entries, index = self.compressor.entries, self.entry_index(seg, x, q_low, positions, cos, sin)
        return dispatch.v4_attention(q, window_kv, self.window, entries, index.to(torch.int32), self.attn_sink,
                                     self.dim ** -0.5)

    def entry_index(self, seg: Segment, x: torch.Tensor, q_low: torch.Tensor, positions: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Each row's entries as rows of the pages [q, J], -1 for none: every finished one (HCA), or the indexer's
        top-k of them (CSA)."""
        pages = seg.context_slots[:seg.end // self.ratio * self.ratio:self.ratio] // self.ratio
        entry = torch.arange(pages.shape[0], device=x.device)[None, :]
        visible = entry < ((positions + 1) // self.ratio)[:, None]
        if self.kind == "csa":
            index_keys = self.indexer.compressor.finished(seg, x.dtype)
            entry = self.indexer.top_entries(x, q_low, cos, sin, index_keys, visible)
            visible = entry >= 0
        return torch.where(visible, pages[entry.clamp_min(0)], -1)


def save_and_write(ring: Ring, seg: Segment, rows: torch.Tensor):
    """seg's new rows into its ring, after keeping the states of the block ends they cross."""
    for end, state in seg.saves:
        ring.save(seg.request_slot, seg.first_position, rows, end, state)
    ring.write(seg.request_slot, seg.first_position, rows)


def sink_attention(q: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """q [S, H, D] over shared keys = values [K, D] where allowed [S, K]; each head's softmax also has its sink
    logit, whose probability mass is dropped (a learned 'attend to nothing')."""
    logits = torch.einsum("shd,kd->hsk", q, keys).float() * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    sink = sinks.float().view(-1, 1, 1).expand(-1, q.shape[0], 1)
    probs = torch.cat([logits, sink], -1).softmax(-1)[..., :-1]
    return torch.einsum("hsk,kd->shd", probs.to(keys.dtype), keys)
