"""CUDA graphs for the two passes every decoding step makes (nano-vllm's capture, vLLM's padding): the target's
decode/verify forward, one graph per token tier, and the draft step, one graph per request-count bucket. A
DeepSeek-V4 target's graphs hold its fixed-shape step (V4Model.forward_rows; its host work before and after runs
around the replay). Each graph
reads fixed (static) input buffers; a step is copied into the smallest graph that holds it, padded so that padding
rows store no KV (slot -1) and padding requests have no queries or context, and replayed. Prefill chunks longer than
a verify row, steps past the largest graph and `--enforce-eager` run eagerly. Graphs are captured largest first into
one shared memory pool. The uniforms that drive sampling are inputs too, drawn on the host from each request's own
generator, so a seeded request samples the same tokens with graphs as without."""
import torch

from engine.context import VarlenBatch, reset_context, set_context
from kernels.flashinfer_attention import PageTable, page_table

TOKEN_TIERS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# DeepSeek-V4's graphs also come per context (its step ranks every entry slot its graph's context has), each token tier
# up to the contexts whose rows x context stay within V4_GRAPH_SLOTS: decode batches to 1M tokens, 512 rows to 32k
CONTEXT_TIERS = (4096, 16384, 65536, 262144, 1048576)
V4_GRAPH_SLOTS = 2**24
REQUEST_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def split(tokens: int, rows: int) -> list[int]:
    """tokens spread over rows as evenly as possible."""
    return [tokens // rows + (i < tokens % rows) for i in range(rows)]


class StepGraph:
    """fn() over static buffers, captured once. On CUDA a torch.cuda.CUDAGraph; elsewhere (the CPU tests, under
    Triton's interpreter) replay re-runs fn on the same buffers and copies its results into the same output tensors,
    as a graph would, which checks the padding and buffer logic the GPU relies on, but not the capture itself."""

    def __init__(self, fn, device: torch.device, pool=None):
        self.fn = fn
        fn()  # warm-up: compiles the Triton kernels and settles the allocator before capture
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.outputs = fn()
        else:
            self.graph, self.outputs = None, fn()

    @property
    def pool(self):
        return self.graph.pool() if self.graph is not None else None

    def replay(self):
        if self.graph is None:
            copy_into(self.outputs, self.fn())
        else:
            self.graph.replay()
        return self.outputs


def copy_into(outputs, results):
    """Write results into the tensors of outputs (the same nesting of tuples / lists; None stays None)."""
    if isinstance(outputs, torch.Tensor):
        outputs.copy_(results)
    elif isinstance(outputs, (tuple, list)):
        for out, result in zip(outputs, results, strict=True):
            copy_into(out, result)


def capture_largest_first(sizes: list[int], make_fn, device: torch.device, pool=None) -> tuple[dict, object]:
    """One StepGraph per size, largest first, all in one memory pool -> (graphs by size, the pool)."""
    graphs = {}
    for size in sorted(sizes, reverse=True):
        graphs[size] = StepGraph(make_fn(size), device, pool)
        pool = graphs[size].pool
    return graphs, pool


def smallest_at_least(sizes: list[int], n: int) -> int | None:
    return next((s for s in sizes if s >= n), None)


class TargetGraphs:
    """The target forward for steps whose requests all bring at most max_q_len tokens (decode: 1, verify: 1 + drafts).
    A graph for T tokens serves up to min(T, max_num_seqs) requests, with contexts up to max_kv_len (DeepSeek-V4: up to
    its context tier, the smallest that holds the step's longest)."""

    @torch.inference_mode()
    def __init__(self, model, device: torch.device, max_num_seqs: int, max_q_len: int, max_kv_len: int,
                 max_tokens: int, capture_layers: tuple[int, ...], make_attention=None, page_size: int = 0,
                 tiers=TOKEN_TIERS):
        """make_attention(requests, pages): a FlashInfer wrapper over graph buffers for one tier (None: our Triton
        attention, fed from the static varlen buffers here)."""
        self.model, self.device, self.capture_layers = model, device, capture_layers
        self.max_num_seqs, self.max_q_len, self.max_kv_len = max_num_seqs, max_q_len, max_kv_len
        self.tiers = sorted({t for t in tiers if t < max_tokens} | {max_tokens})
        T, B = self.tiers[-1], self.seats(self.tiers[-1])
        on = {"device": device}
        self.input_ids = torch.zeros(T, dtype=torch.long, **on)
        self.positions = torch.zeros(T, dtype=torch.long, **on)
        self.slot_mapping = torch.full((T,), -1, dtype=torch.long, **on)
        self.page_size, self.attention = page_size, {}
        if make_attention is not None:
            pages = -(-max_kv_len // page_size)
            self.attention = {t: make_attention(self.seats(t), self.seats(t) * pages) for t in self.tiers}
        else:
            self.cu_seqlens_q = torch.zeros(B + 1, dtype=torch.int32, **on)
            self.kv_lens = torch.zeros(B, dtype=torch.int32, **on)
            # each graph's [seats, context] key slots: a view of one buffer as large as the largest of them
            self.kv_slots = torch.zeros(max(self.seats(t) * c for t in self.tiers for c in self.contexts(t)),
                                        dtype=torch.long, **on)
            self.request_slots = torch.zeros(B, dtype=torch.long, **on)  # DeepSeek-V4's rings
        # one pool for every graph, the draft's too: they replay one at a time
        keys = [(t, c) for t in self.tiers for c in self.contexts(t)]
        self.graphs, self.pool = capture_largest_first(keys, self.forward_fn, device)

    def seats(self, tokens: int) -> int:
        return min(tokens, self.max_num_seqs)

    def contexts(self, tokens: int) -> list[int]:
        """The contexts token tier `tokens` has graphs for: max_kv_len, or DeepSeek-V4's context tiers within
        V4_GRAPH_SLOTS (at least the smallest)."""
        if not self.model.own_attention:
            return [self.max_kv_len]
        tiers = [c for c in CONTEXT_TIERS if c < self.max_kv_len] + [self.max_kv_len]
        return [c for c in tiers if tokens * c <= V4_GRAPH_SLOTS] or tiers[:1]

    def slots_view(self, tokens: int, context: int) -> torch.Tensor:
        return self.kv_slots[:self.seats(tokens) * context].view(self.seats(tokens), context)

    def forward_fn(self, key: tuple[int, int]):
        (t, c), batch = key, None
        b, attention = self.seats(t), self.attention.get(t)
        if attention is not None:
            attention.plan(self.capture_table(t))  # the graph's first plan: it fixes the rows the graph holds
        else:
            batch = VarlenBatch(self.cu_seqlens_q[:b + 1], self.slots_view(t, c), self.kv_lens[:b],
                                min(t, self.max_q_len))

        if self.model.own_attention:  # DeepSeek-V4: its fixed-shape step (engine/models/deepseek_v4/step_rows.py)
            return lambda: self.model.forward_rows(self.input_ids[:t], self.positions[:t], self.capture_layers,
                                                   batch.cu_seqlens_q, batch.kv_slots, self.request_slots[:b])

        def forward():
            set_context(self.slot_mapping[:t], [], batch, attention)
            try:
                return self.model(self.input_ids[:t], self.positions[:t], self.capture_layers)
            finally:
                reset_context()
        return forward

    def capture_table(self, t: int) -> PageTable:
        """A step that fills graph t: its t rows spread over its requests, each attending to itself in page 0."""
        q_lens = split(t, self.seats(t))
        return page_table(q_lens, q_lens, [[0] * -(-q // self.page_size) for q in q_lens], self.page_size)

    def tier_for(self, q_lens: list[int], kv_lens: list[int], capture_layers: tuple[int, ...]) -> int | None:
        """The graph that can run a step of these requests' query / KV lengths, or None (eager)."""
        if max(q_lens) > self.max_q_len or max(kv_lens) > self.max_kv_len:
            return None
        if capture_layers and capture_layers != self.capture_layers:
            return None
        tier = smallest_at_least(self.tiers, sum(q_lens))
        if tier is None or len(q_lens) > self.seats(tier) or max(kv_lens) > self.contexts(tier)[-1]:
            return None
        return tier

    @torch.inference_mode()
    def run(self, tier: int, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            batch: VarlenBatch | None, want_features: bool = True,
            request_slots: list[int] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Copy the step into graph `tier`'s buffers, replay, and return its rows (features copied out of the graph's
        memory, which the next replay overwrites; [] unless wanted). With FlashInfer, batch is None: the step was
        planned into the tier's wrapper already."""
        n = input_ids.shape[0]
        for static, live in ((self.input_ids, input_ids), (self.positions, positions),
                             (self.slot_mapping, slot_mapping)):
            static[:n].copy_(live, non_blocking=True)
        self.input_ids[n:tier].zero_()
        self.positions[n:tier].zero_()
        self.slot_mapping[n:tier].fill_(-1)
        context = self.contexts(tier)[-1]
        if batch is not None:
            context = smallest_at_least(self.contexts(tier), batch.kv_slots.shape[1])
            self.copy_varlen(tier, context, n, batch)
        if request_slots is not None:
            self.request_slots[:len(request_slots)].copy_(torch.tensor(request_slots), non_blocking=True)
        hidden, captured = self.graphs[tier, context].replay()
        return hidden[:n], [c[:n].clone() for c in captured] if want_features else []

    def copy_varlen(self, tier: int, context: int, n: int, batch: VarlenBatch):
        b, width, seats = batch.kv_lens.shape[0], batch.kv_slots.shape[1], self.seats(tier)
        self.cu_seqlens_q[:b + 1].copy_(batch.cu_seqlens_q, non_blocking=True)
        self.cu_seqlens_q[b + 1:seats + 1].fill_(n)  # padding requests: no queries
        self.kv_lens[:b].copy_(batch.kv_lens, non_blocking=True)
        self.kv_lens[b:seats].zero_()
        self.slots_view(tier, context)[:b, :width].copy_(batch.kv_slots, non_blocking=True)


class DraftGraphs:
    """The draft step (backbone, LM head, fused Markov sampling, confidence) for requests sampling with temperature
    only (DSparkDraft.has_fused_markov); one graph per request-count bucket."""

    @torch.inference_mode()
    def __init__(self, draft, device: torch.device, max_num_seqs: int, max_ctx_len: int, num_tokens: int,
                 pool=None, buckets=REQUEST_BUCKETS):
        self.draft, self.device, self.num_tokens, self.max_ctx_len = draft, device, num_tokens, max_ctx_len
        self.buckets = sorted({b for b in buckets if b < max_num_seqs} | {max_num_seqs})
        B = self.buckets[-1]
        on = {"device": device}
        self.anchors = torch.zeros(B, dtype=torch.long, **on)
        self.starts = torch.zeros(B, dtype=torch.long, **on)
        self.kv_slots = torch.zeros(B, max_ctx_len, dtype=torch.long, **on)
        self.temperature = torch.ones(B, dtype=torch.float32, **on)
        self.uniforms = torch.full((B, num_tokens), 0.5, dtype=torch.float32, **on)
        self.graphs, _ = capture_largest_first(self.buckets, self.step_fn, device, pool)

    def step_fn(self, b: int):
        def step():
            starts = self.starts[:b]
            return self.draft.fused_block(self.anchors[:b], starts, self.kv_slots[:b], starts, self.num_tokens,
                                          self.temperature[:b], self.uniforms[:b])
        return step

    def bucket_for(self, num_requests: int, ctx_width: int) -> int | None:
        return None if ctx_width > self.max_ctx_len else smallest_at_least(self.buckets, num_requests)

    @torch.inference_mode()
    def run(self, bucket: int, anchors: torch.Tensor, starts: torch.Tensor, kv_slots: torch.Tensor,
            temperature: torch.Tensor, uniforms: torch.Tensor):
        """Copy the requests into graph `bucket`'s buffers (padding requests: anchor 0 at position 0 with no context)
        and replay -> (tokens, probs, confidence, confidence logits) of the real requests, copied out."""
        n, width = anchors.shape[0], kv_slots.shape[1]
        self.anchors[:n].copy_(anchors, non_blocking=True)
        self.anchors[n:bucket].zero_()
        self.starts[:n].copy_(starts, non_blocking=True)
        self.starts[n:bucket].zero_()
        self.kv_slots[:n, :width].copy_(kv_slots, non_blocking=True)
        self.temperature[:n].copy_(temperature, non_blocking=True)
        self.uniforms[:n].copy_(uniforms, non_blocking=True)
        outputs = self.graphs[bucket].replay()
        return tuple(None if t is None else t[:n].clone() for t in outputs)
