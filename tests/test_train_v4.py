"""`python -m train` on DeepSeek-V4's in-checkpoint DSpark module (the pipeline, not quality): a tiny V4 + DSpark
checkpoint in the released layout, answers sampled from it by our engine, a few training steps from the checkpoint's
own module (its target features checked against transformers' layer outputs), and the result written back as a copy
of the checkpoint that the engine serves with one flag."""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_v4_dspark

from engine.drafts.loader import read_calibration
from engine.llm import LLM
from engine.loader import load_model
from engine.sampling_params import SamplingParams
from train.__main__ import main as train_cli
from train.config import TrainConfig
from train.data import conversation_row
from train.trainer import Trainer
from train.v4_module import v4_features

LAYERS = [1, 2, 3]


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4t") / "tiny-v4-dspark"
    hf = save_tiny_v4_dspark(path, seed=1, target_layer_ids=LAYERS)
    return path, hf


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, v4):
    path, _ = v4
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 12, (28,), generator=g)
    prompts = [torch.randint(20, 300, (int(n),), generator=g).tolist() for n in lengths]
    llm = LLM(model=str(path), dtype="float32", spec_method="none")
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True, seed=1),
                        use_tqdm=False)
    data = tmp_path_factory.mktemp("data") / "train.jsonl"
    data.write_text("".join(json.dumps(conversation_row(str(p), p, o.token_ids, o.text)) + "\n"
                            for p, o in zip(prompts[:24], outs[:24])))
    return data, prompts[24:]


def config(path, data, out, **overrides) -> TrainConfig:
    values = dict(method="dspark", target=str(path), data=str(data), features_dir=str(out / "features"),
                  min_loss_tokens=4, num_anchors=16, batch_size=4, epochs=1, lr=3e-3, warmup_ratio=0.05,
                  out=str(out / "run"), checkpoint_every=1000, log_every=5, num_threads=2, max_steps=30)
    return TrainConfig(**(values | overrides))


def test_features_are_the_target_layers_outputs(v4):
    path, hf = v4
    tokens = [5, 17, 33, 250, 7, 9, 8, 100, 41, 12]
    (features, last), = v4_features(load_model(path, torch.float32), [tokens], LAYERS)
    outputs = {}
    hooks = [hf.model.layers[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
             for i in LAYERS]
    with torch.no_grad():
        ref = hf(torch.tensor([tokens]), output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(features, torch.cat([outputs[i][0].mean(-2) for i in LAYERS], -1), atol=2e-5,
                               rtol=2e-5)
    torch.testing.assert_close(hf.lm_head(last), ref.logits[0], atol=2e-5, rtol=2e-5)


def acceptance(model_dir, prompts) -> float:
    llm = LLM(model=str(model_dir), dtype="float32", spec_method="dspark", verify_policy="full")
    llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True, seed=0), use_tqdm=False)
    return llm.spec_stats.mean_acceptance_length


def test_training_writes_back_a_checkpoint_the_engine_serves_and_calibrates(tmp_path, v4, dataset, monkeypatch):
    path, _ = v4
    data, held_out = dataset
    trainer = Trainer(config(path, data, tmp_path))
    start = {n: t.clone() for n, t in trainer.draft.state_dict().items()}
    first = trainer.train_step()
    out = trainer.train()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.9 * first["loss"]
    assert log[-1]["accept"][0] > first["accept_sum"][0] / first["accept_count"][0]
    before, after = load_file(str(path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    trained = trainer.draft.state_dict()
    for name, tensor in after.items():
        if name.startswith("mtp."):
            assert torch.equal(tensor, trained[name].to(tensor.dtype)), name
        else:
            assert torch.equal(tensor, before[name]), name
    assert any(not torch.equal(trained[n], start[n]) for n in start)
    assert json.loads((out / "config.json").read_text()) == json.loads((path / "config.json").read_text())
    plain = LLM(model=str(out), dtype="float32", spec_method="none")
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [o.token_ids for o in plain.generate(held_out, greedy, use_tqdm=False)]
    served = LLM(model=str(out), dtype="float32", spec_method="dspark")
    assert [o.token_ids for o in served.generate(held_out, greedy, use_tqdm=False)] == expected
    print(f"\ntau at T=1 on held-out prompts: {acceptance(path, held_out):.3f} before, "
          f"{acceptance(out, held_out):.3f} after {trainer.step} steps")
    calibrate(out, tmp_path, monkeypatch)


def calibrate(checkpoint, tmp_path, monkeypatch):
    """`python -m train calibrate` on the written checkpoint (its module is the draft): sts.json lands beside it and
    the engine serving it reads it."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the quick brown fox", "def add(a, b):",
                                                                           "Paris is the capital", "0123 4567"]))
    argv = ["train", "calibrate", "--draft", checkpoint, "--model", checkpoint, "--dtype", "float32", "--kv-cache-gb",
            "0.05", "--out", tmp_path / "sts", "--prompts", f"jsonl:{prompts}", "--num-prompts", 4, "--max-tokens", 24]
    monkeypatch.setattr(sys, "argv", [str(a) for a in argv])
    train_cli()
    temperatures, biases = read_calibration(checkpoint, 4)
    assert biases.abs().max() > 0
    head = LLM(model=str(checkpoint), dtype="float32", spec_method="dspark").speculator.drafter.draft.confidence_head
    assert torch.equal(head.temperatures, temperatures) and torch.equal(head.biases, biases)


def test_a_v4_target_without_a_module_is_refused(tmp_path, dataset):
    from tiny_models import save_tiny_v4
    path = tmp_path / "plain-v4"
    save_tiny_v4(path, seed=1)
    with pytest.raises(ValueError, match="declares none"):
        Trainer(config(path, dataset[0], tmp_path))
