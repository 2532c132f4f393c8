"""python -m train <command>: draft training tools."""
import argparse

from engine.config import DEFAULT_MODEL_NAME, DEFAULT_MODELS_DIR


def main():
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init-draft", help="write a freshly initialised DSpark/DFlash draft (DeepSpec format)")
    init.add_argument("--target", default=str(DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME))
    init.add_argument("--out", required=True)
    init.add_argument("--num-layers", type=int, default=2)
    init.add_argument("--block-size", type=int, default=7)
    init.add_argument("--markov-rank", type=int, default=64, help="0 = DFlash (no sequential head)")
    init.add_argument("--markov-head-type", default="vanilla", choices=["vanilla", "gated", "rnn"])
    init.add_argument("--target-layer-ids", type=int, nargs="+")
    init.add_argument("--mask-token-id", type=int)
    init.add_argument("--seed", type=int, default=0)
    data = sub.add_parser("data", help="answer ShareGPT training prompts with the target (our engine) into jsonl")
    data.add_argument("--model", default=str(DEFAULT_MODELS_DIR / DEFAULT_MODEL_NAME))
    data.add_argument("--out", default="data/sharegpt_smollm2.jsonl")
    data.add_argument("--num-prompts", type=int, default=1024)
    data.add_argument("--max-tokens", type=int, default=256)
    data.add_argument("--max-prompt-tokens", type=int, default=256)
    data.add_argument("--max-num-seqs", type=int, default=64)
    data.add_argument("--seed", type=int, default=0)
    for name, help_text in (("run", "train a draft (resumes from its checkpoint)"),
                            ("features", "only build the target-feature cache of a training config")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--config", help="a JSON training config (train/configs/*.json)")
        cmd.add_argument("--out")
        cmd.add_argument("--data")
        cmd.add_argument("--max-steps", type=int)
        cmd.add_argument("--max-minutes", type=float)
        cmd.add_argument("--num-threads", type=int)
    cal = sub.add_parser("calibrate", help="fit Sequential Temperature Scaling of a DSpark draft -> sts.json")
    cal.add_argument("--draft", required=True)
    cal.add_argument("--model", default="", help="target model directory ('' = the embedded default)")
    cal.add_argument("--prompts", default="sharegpt-test", help="sharegpt-test | mtbench | humaneval | math | jsonl:P")
    cal.add_argument("--num-prompts", type=int, default=200)
    cal.add_argument("--max-tokens", type=int, default=128)
    cal.add_argument("--max-prompt-tokens", type=int, default=256)
    cal.add_argument("--temperature", type=float, default=1.0)
    cal.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    cal.add_argument("--num-threads", type=int, default=0)
    cal.add_argument("--max-num-seqs", type=int, default=16)
    cal.add_argument("--kv-cache-gb", type=float, default=1.0)
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--out", default="", help="where the metrics JSON and the reliability PNG go ('' = the draft)")
    cal.add_argument("--scaling", default="affine", choices=["affine", "temperature"],
                     help="per position a temperature and a bias (affine), or a temperature only (the paper's STS)")
    cal.add_argument("--save-records", default="", help="also write the confidence records (jsonl) here")
    cal.add_argument("--from-records", default="", help="refit from saved records instead of rolling out")
    vocab = sub.add_parser("draft-vocab", help="choose the tokens a draft may propose (FR-Spec) -> draft_vocab.json")
    vocab.add_argument("--draft", required=True)
    vocab.add_argument("--model", default="", help="target model directory ('' = the embedded default)")
    vocab.add_argument("--size", type=int, default=16384)
    vocab.add_argument("--data", default="data/sharegpt_smollm2.jsonl", help="training conversations ('' = none)")
    vocab.add_argument("--data-weight", type=float, default=0.5, help="their share of the frequency mix")
    vocab.add_argument("--held-out", type=int, default=128, help="last conversations kept out to measure coverage")
    vocab.add_argument("--sharegpt-replies", type=int, default=40000, help="ShareGPT assistant turns to count")
    args = parser.parse_args()
    if args.command in ("run", "features"):
        from train.config import TrainConfig
        cfg = TrainConfig.load(args.config, out=args.out, data=args.data, max_steps=args.max_steps,
                               max_minutes=args.max_minutes, num_threads=args.num_threads)
        if args.command == "features":
            from train.trainer import feature_records
            feature_records(cfg)
        else:
            from train.trainer import Trainer
            print(f"exported {Trainer(cfg).train()}")
    if args.command == "data":
        from train.data import generate_dataset
        generate_dataset(args.out, args.num_prompts, args.max_tokens, args.max_prompt_tokens, seed=args.seed,
                         model=args.model, max_num_seqs=args.max_num_seqs)
    if args.command == "draft-vocab":
        from train.draft_vocab import write_draft_vocab
        print(f"wrote {write_draft_vocab(args)}")
    if args.command == "calibrate":
        from train.calibrate import calibrate
        calibrate(args)
    if args.command == "init-draft":
        from train.init_draft import init_draft
        path = init_draft(args.target, args.out, args.num_layers, args.block_size, args.markov_rank,
                          args.markov_head_type, args.target_layer_ids, args.mask_token_id, seed=args.seed)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
