"""Rank 0 tells the other ranks what to run, one packed int64 tensor per device call (never pickled objects): the
target forward's sequences (computed and scheduled counts, block tables, token ids), the draft's context rows (their
target features' bytes ride in the same tensor) and the draft block's anchors and key slots. Workers rebuild the
inputs and run the same forward; only the calls with collectives matter to them, so they skip sampling, whose result
reaches them as the next step's token ids. A message fits one broadcast of PACKET_WORDS words; a longer one sends its
tail in a second. After vLLM's broadcast of the model input to the driver's workers (vllm/worker/worker_base.py),
with a fixed-size packed tensor instead of a pickled dict."""
from dataclasses import dataclass, field

import torch

from engine import distributed
from engine.sequence import step_saves

PACKET_WORDS = 4096
FORWARD, CONTEXT, DRAFT, KEEP_ALIVE, STOP = range(5)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclass
class RemoteSeq:
    """What a forward reads of a Sequence, rebuilt on a worker."""
    num_computed_tokens: int
    num_scheduled_tokens: int
    block_table: list[int]
    token_ids: list[int]
    request_slot: int | None = None  # DeepSeek-V4's per-request rings
    state_restore: tuple[int, int] | None = None  # and the prefix cache's saved ring states (Sequence's fields)
    state_saves: dict[int, int] = field(default_factory=dict)

    def scheduled_token_ids(self) -> list[int]:
        return self.token_ids


def sending() -> bool:
    return distributed.is_parallel() and distributed.is_driver()


def send(op: int, parts: list[torch.Tensor]):
    words = torch.cat([torch.tensor([0, op])] + [p.reshape(-1).long() for p in parts])
    words[0] = len(words)
    first = torch.zeros(PACKET_WORDS, dtype=torch.long)
    first[:min(len(words), PACKET_WORDS)] = words[:PACKET_WORDS]
    distributed.broadcast_control(first)
    if len(words) > PACKET_WORDS:
        distributed.broadcast_control(words[PACKET_WORDS:].contiguous())


def receive() -> tuple[int, torch.Tensor]:
    first = torch.zeros(PACKET_WORDS, dtype=torch.long)
    distributed.broadcast_control(first)
    total = int(first[0])
    if total <= PACKET_WORDS:
        return int(first[1]), first[2:total]
    tail = torch.zeros(total - PACKET_WORDS, dtype=torch.long)
    distributed.broadcast_control(tail)
    return int(first[1]), torch.cat([first[2:], tail])


def send_forward(seqs, num_logits: list[int], capture: bool):
    if not sending():
        return
    head, saves = [len(seqs), int(capture)], [step_saves(s) for s in seqs]
    for s, n, saved in zip(seqs, num_logits, saves):
        slot = -1 if s.request_slot is None else s.request_slot
        restore = s.state_restore or (-1, -1)
        head += [s.num_computed_tokens, s.num_scheduled_tokens, n, len(s.block_table), slot, *restore, len(saved)]
    tables = [b for s in seqs for b in s.block_table]
    pairs = [v for saved in saves for pair in saved for v in pair]
    tokens = [t for s in seqs for t in s.scheduled_token_ids()]
    send(FORWARD, [torch.tensor(head), *(torch.tensor(part, dtype=torch.long) for part in (tables, pairs, tokens))])


def unpack_forward(words: torch.Tensor) -> tuple[list[RemoteSeq], list[int], bool]:
    values = words.tolist()
    count, capture = values[:2]
    heads, at = [values[2 + 8 * i: 10 + 8 * i] for i in range(count)], 2 + 8 * count
    seqs, num_logits = [], []
    for computed, scheduled, logits, blocks, slot, restore_end, restore_slot, _ in heads:
        seqs.append(RemoteSeq(computed, scheduled, values[at:at + blocks], [], None if slot < 0 else slot,
                              None if restore_end < 0 else (restore_end, restore_slot)))
        num_logits.append(logits)
        at += blocks
    for seq, head in zip(seqs, heads):
        pairs, at = values[at:at + 2 * head[-1]], at + 2 * head[-1]
        seq.state_saves = dict(zip(pairs[::2], pairs[1::2]))
    for seq in seqs:
        seq.token_ids, at = values[at:at + seq.num_scheduled_tokens], at + seq.num_scheduled_tokens
    return seqs, num_logits, bool(capture)


def tensor_words(t: torch.Tensor) -> torch.Tensor:
    """t's bytes as int64 words (zero-padded to a whole word)."""
    raw = t.detach().cpu().contiguous().view(-1).view(torch.uint8)
    return torch.cat([raw, raw.new_zeros(-len(raw) % 8)]).view(torch.long)


def words_tensor(words: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    count = torch.Size(shape).numel()
    return words.contiguous().view(torch.uint8)[:count * dtype.itemsize].view(dtype).view(shape).clone()


def send_context(features: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor):
    if not sending():
        return
    head = torch.tensor([features.shape[0], features.shape[1], DTYPES.index(features.dtype)])
    send(CONTEXT, [head, positions.cpu(), slot_mapping.cpu(), tensor_words(features)])


def unpack_context(words: torch.Tensor, device: torch.device):
    rows, width, dtype = words[:3].tolist()
    positions, slot_mapping = words[3:3 + rows], words[3 + rows:3 + 2 * rows]
    features = words_tensor(words[3 + 2 * rows:], DTYPES[dtype], (rows, width))
    return features.to(device), positions.to(device), slot_mapping.to(device)


def send_draft(anchors: torch.Tensor, starts: torch.Tensor, kv_slots: torch.Tensor, ctx_lens: torch.Tensor,
               num_tokens: int):
    if not sending():
        return
    head = torch.tensor([anchors.shape[0], kv_slots.shape[1], num_tokens])
    send(DRAFT, [head, anchors.cpu(), starts.cpu(), ctx_lens.cpu(), kv_slots.cpu()])


def unpack_draft(words: torch.Tensor, device: torch.device):
    batch, width, num_tokens = words[:3].tolist()
    anchors, starts, ctx_lens = (words[3 + i * batch:3 + (i + 1) * batch].to(device) for i in range(3))
    kv_slots = words[3 + 3 * batch:3 + 3 * batch + batch * width].view(batch, width).to(device)
    return anchors, starts, kv_slots, ctx_lens, num_tokens


def keep_alive():
    """Rank 0 while idle: every rank answers within the collective timeout, or this raises."""
    if sending():
        send(KEEP_ALIVE, [])
        distributed.all_reduce(torch.zeros(1))


def stop_workers():
    if sending():
        send(STOP, [])


@torch.inference_mode()
def serve(runner):
    """A worker's loop: run what rank 0 sends until it says stop."""
    device = runner.device
    while True:
        op, words = receive()
        if op == STOP:
            return
        if op == KEEP_ALIVE:
            distributed.all_reduce(torch.zeros(1))
        elif op == FORWARD:
            seqs, num_logits, capture = unpack_forward(words)
            runner.forward(seqs, num_logits, runner.capture_layers if capture else ())
        elif op == CONTEXT:
            runner.drafter.draft.extend_context(*unpack_context(words, device))
        elif op == DRAFT:
            runner.drafter.draft.draft_collectives(*unpack_draft(words, device))
