"""The draft trainer end to end on a tiny target: features against transformers, a real acceptance gain measured by
the engine, DDP (2 gloo ranks) equal to one process, checkpoints that resume and load in the engine."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from engine.drafts.loader import load_draft
from engine.llm import LLM
from engine.loader import load_model
from engine.models.layers import pack_linears_for_cpu
from engine.sampling_params import SamplingParams
from train.config import TrainConfig
from train.data import conversation_row
from train.features import target_features
from train.trainer import Trainer, feature_records

VOCAB_PROMPT_RANGE = (20, 300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_llama_dir):
    """Prompts of random tokens answered by the tiny target through our engine (seeded sampling)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(*VOCAB_PROMPT_RANGE, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 12, (48,), generator=g)]
    llm = LLM(model=str(tiny_llama_dir), num_threads=2)
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=1), use_tqdm=False)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [conversation_row(str(p), p, o.token_ids, o.text) for p, o in zip(prompts[:40], outs[:40])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, prompts[40:]


def tiny_config(tiny_llama_dir, dataset, out, **overrides) -> TrainConfig:
    values = dict(method="dspark", target=str(tiny_llama_dir), num_layers=1, block_size=4, markov_rank=8,
                  target_layer_ids=[0, 1], data=str(dataset[0]), features_dir=str(out / "features"), min_loss_tokens=4,
                  num_anchors=16, batch_size=4, epochs=1, lr=3e-3, warmup_ratio=0.05, out=str(out / "run"),
                  checkpoint_every=1000, log_every=5, num_threads=2)
    return TrainConfig(**(values | overrides))


def test_features_match_transformers(tiny_llama_dir):
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ours = load_model(tiny_llama_dir, torch.float32)
    pack_linears_for_cpu(ours)
    seqs = [[5, 17, 33, 250, 7], [9, 8, 100]]
    outs = target_features(ours, seqs, [-1, 1])
    for seq, (features, last) in zip(seqs, outs):
        ref = hf(torch.tensor([seq]), output_hidden_states=True).hidden_states
        assert torch.allclose(features, torch.cat([ref[0][0], ref[2][0]], -1), atol=1e-4)
        assert torch.allclose(last, ref[-1][0], atol=1e-4)  # transformers' last entry is after the final norm


def measured_tau(target_dir, draft_dir, prompts) -> float:
    """At temperature 1 (seeded): the tiny random target is too flat for greedy agreement to say much."""
    llm = LLM(model=str(target_dir), spec_method="dspark", draft=str(draft_dir), num_threads=2)
    params = SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True, seed=0)
    llm.generate(prompts, params, use_tqdm=False)
    return llm.spec_stats.mean_acceptance_length


def test_training_raises_measured_acceptance(tmp_path, tiny_llama_dir, dataset):
    trainer = Trainer(tiny_config(tiny_llama_dir, dataset, tmp_path, max_steps=60, init_from_target=False))
    before = measured_tau(tiny_llama_dir, trainer.export(), dataset[1])
    first = trainer.train_step()
    draft_dir = trainer.train()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    after = measured_tau(tiny_llama_dir, draft_dir, dataset[1])
    assert log[-1]["loss"] < 0.9 * first["loss"]
    assert after > before + 0.5, (before, after)


def test_checkpoint_resumes_and_loads_in_engine(tmp_path, tiny_llama_dir, dataset):
    cfg = tiny_config(tiny_llama_dir, dataset, tmp_path, max_steps=4, checkpoint_every=2)
    trainer = Trainer(cfg)
    trainer.train_step()
    trainer.train_step()
    trainer.save()
    resumed = Trainer(cfg)
    assert resumed.step == 2
    for (name, a), b in zip(trainer.draft.state_dict().items(), resumed.draft.state_dict().values()):
        assert torch.equal(a, b), name
    llm = LLM(model=str(tiny_llama_dir), spec_method="dspark", draft=str(tmp_path / "run" / "draft"))
    served = llm.model_runner.drafter.draft.state_dict()
    for name, tensor in trainer.draft.state_dict().items():
        assert torch.equal(served[name], tensor.to(served[name].dtype)), name


def test_dflash_config_trains_backbone_only(tmp_path, tiny_llama_dir, dataset):
    trainer = Trainer(tiny_config(tiny_llama_dir, dataset, tmp_path, method="dflash", max_steps=2))
    assert trainer.draft.markov_head is None and trainer.draft.confidence_head is None
    stats = trainer.train_step()
    assert stats["l1"] > 0 and stats["conf"] == 0  # l1 is still measured (for the acceptance estimate)
    LLM(model=str(tiny_llama_dir), spec_method="dflash", draft=str(trainer.export()))


def test_run_from_a_draft_over_its_vocabulary_in_bf16(tmp_path, tiny_llama_dir, dataset):
    """init_from starts from a draft's weights, draft_vocab trains over its tokens, bf16 autocasts: the loss falls,
    the export carries the vocabulary, and the engine serves it over those tokens."""
    source = Trainer(tiny_config(tiny_llama_dir, dataset, tmp_path / "a", max_steps=1)).export()
    answers = [t for row in map(json.loads, dataset[0].read_text().splitlines())
               for t, m in zip(row["input_ids"], row["loss_mask"]) if m]
    frequent = torch.bincount(torch.tensor(answers)).argsort(descending=True)[:len(set(answers)) // 2]
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"token_ids": frequent.tolist()}))
    cfg = tiny_config(tiny_llama_dir, dataset, tmp_path / "b", init_from=str(source), draft_vocab=str(vocab),
                      bf16=True, max_steps=30)
    trainer = Trainer(cfg)
    start = load_draft(source, load_model(tiny_llama_dir, torch.float32), torch.float32, "dspark", vocab_size=-1)
    for name, tensor in start.state_dict().items():
        assert torch.equal(trainer.draft.state_dict()[name], tensor), name
    first = trainer.train_step()
    draft_dir = trainer.train()
    log = [json.loads(line) for line in (tmp_path / "b" / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.9 * first["loss"]
    assert log[-1]["accept"][0] > first["accept_sum"][0] / first["accept_count"][0]
    assert json.loads((draft_dir / "draft_vocab.json").read_text()) == json.loads(vocab.read_text())
    llm = LLM(model=str(tiny_llama_dir), spec_method="dspark", draft=str(draft_dir))
    assert llm.model_runner.drafter.draft.vocab_ids.tolist() == frequent.tolist()
    with pytest.raises(ValueError, match="init_from"):
        Trainer(tiny_config(tiny_llama_dir, dataset, tmp_path / "c", init_from=str(source), num_layers=2))


def gradients(trainer: Trainer, step: int) -> dict[str, torch.Tensor]:
    trainer.accumulate_gradients(step)
    return {n: p.grad.clone() for n, p in trainer.draft.named_parameters() if p.grad is not None}


def ddp_rank(rank: int, port: int, cfg: TrainConfig, out_path: str):
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank)}
    cfg.num_threads = 1
    try:
        torch.save(gradients(Trainer(cfg), step=0), f"{out_path}.{rank}")
    finally:
        torch.distributed.destroy_process_group()
    # Skip the interpreter's teardown once the gradients are saved: gloo's threads can still abort it ("terminate
    # called without an active exception", ~1 run in 3 on 2 cores), which failed the test after its work was done.
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path, tiny_llama_dir, dataset):
    cfg = tiny_config(tiny_llama_dir, dataset, tmp_path)
    feature_records(cfg)  # build the cache once, before the ranks start
    single = gradients(Trainer(cfg), step=0)
    mp.start_processes(ddp_rank, args=(free_port(), cfg, str(tmp_path / "grads")), nprocs=2, start_method="spawn")
    for rank in range(2):
        ranked = torch.load(tmp_path / f"grads.{rank}")
        assert ranked.keys() == single.keys()
        for name, grad in single.items():
            assert torch.allclose(ranked[name], grad, rtol=1e-4, atol=1e-6), name


def test_feature_cache_of_other_conversations_is_refused(tmp_path, tiny_llama_dir, dataset):
    """The cache is keyed by the data file's path: a rewritten file must not silently reuse stale features."""
    data = tmp_path / "train.jsonl"
    rows = dataset[0].read_text().splitlines()
    data.write_text("\n".join(rows[:8]) + "\n")
    cfg = tiny_config(tiny_llama_dir, dataset, tmp_path, data=str(data))
    assert len(feature_records(cfg)) == 8
    changed = json.loads(rows[0])
    changed["input_ids"][-1] = (changed["input_ids"][-1] + 1) % 300
    data.write_text("\n".join([json.dumps(changed)] + rows[1:8]) + "\n")
    with pytest.raises(ValueError, match="delete it to rebuild"):
        feature_records(cfg)
