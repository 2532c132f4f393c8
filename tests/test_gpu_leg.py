"""The GPU training leg (train/gpu_leg.py) on CPU: its plain-torch prefill equals the feature cache's engine path,
conversations merged into one forward give the loss they give apart, and pack -> train reassembles the target from
its parts, refuses a stale part, and writes a draft in shards that the engine loads with the trained weights."""
import json

import pytest
import torch

from engine.drafts.loader import load_draft
from engine.loader import load_model
from kernels import quant_linear
from tests.test_gguf_model import gguf_model_dir
from train.blocks import make_blocks, sample_anchors
from train.data import conversation_row
from train.features import target_features
from train.gpu_leg import assemble_target, merge, pack, prefill_features, train
from train.init_draft import init_draft
from train.trainer import DraftLoss


def test_prefill_features_equal_the_feature_cache_path(tiny_llama_dir):
    model = load_model(tiny_llama_dir, torch.float32)
    seqs = [[5, 17, 33, 250, 7, 9], [9, 8, 100], [4, 4, 4, 4]]
    ours = prefill_features(model, seqs, [0, 1], torch.device("cpu"), torch.float32)
    for (features, last), (ref_features, ref_last) in zip(ours, target_features(model, seqs, [0, 1])):
        assert torch.allclose(features, ref_features, atol=1e-5)
        assert torch.allclose(last, ref_last, atol=1e-5)


def test_merged_conversations_give_the_losses_they_give_apart(tmp_path, tiny_llama_dir):
    model = load_model(tiny_llama_dir, torch.float32)
    init_draft(str(tiny_llama_dir), tmp_path / "draft", 1, 4, 8, "vanilla", [0, 1], dtype="float32", seed=0)
    draft = load_draft(tmp_path / "draft", model, torch.float32, "dspark")
    loss = DraftLoss(draft, model.lm_head, 4.0)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(20, 300, (n,), generator=g).tolist() for n in (20, 31, 12)]
    records, blocks = [], []
    for seq, (features, last) in zip(seqs, prefill_features(model, seqs, [0, 1], torch.device("cpu"), torch.float32)):
        mask = torch.arange(len(seq)) >= 5
        records.append({"features": features, "last_hidden": last})
        blocks.append(make_blocks(torch.tensor(seq), mask, sample_anchors(mask, 6, g), 4, draft.config.mask_token_id))
    apart = [loss(r, b) for r, b in zip(records, blocks)]
    merged = loss(*merge(records, blocks))
    for key in ("ce", "l1", "conf", "weight", "accept_sum", "accept_count"):
        assert torch.allclose(getattr(merged, key), sum(getattr(s, key) for s in apart), rtol=1e-4, atol=1e-5), key


@pytest.mark.skipif(not quant_linear.available(), reason="CPU kernels unavailable here")
def test_pack_then_train_writes_a_sharded_draft_the_engine_loads(tmp_path):
    target, _ = gguf_model_dir(tmp_path, "llama")
    g = torch.Generator().manual_seed(0)
    rows = [conversation_row(str(i), torch.randint(20, 300, (6,), generator=g).tolist(),
                             torch.randint(20, 300, (24,), generator=g).tolist(), "") for i in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(dict(method="dspark", target=str(target), num_layers=1, block_size=4, markov_rank=8,
                                      target_layer_ids=[0, 1], data=str(data), min_loss_tokens=4, num_anchors=8,
                                      batch_size=2, lr=3e-3, log_every=1)))
    packed = pack(str(config), str(tmp_path / "pack"), part_mib=0.05)
    meta = json.loads((packed / "base" / "meta.json").read_text())
    assert meta["conversations"] == 6 and len(meta["parts"]) > 1
    draft = train(str(packed), str(tmp_path / "run"), minutes=5, device="cpu", max_steps=3,
                  export_to=str(tmp_path / "export"))
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    shards = sorted((tmp_path / "export").glob("model-*.safetensors"))
    assert shards and not (tmp_path / "export" / "model.safetensors").exists()
    model = load_model(target, torch.float32)
    exported = load_draft(tmp_path / "export", model, torch.float32, "dspark").state_dict()
    trained = load_draft(draft, model, torch.float32, "dspark").state_dict()
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    (packed / "target" / "model.gguf").unlink()  # a part that changed since the pack is refused
    part = packed / meta["parts"][0]["file"]
    part.write_bytes(b"\0" + part.read_bytes()[1:])
    with pytest.raises(ValueError, match="sha256"):
        assemble_target(packed, meta)
