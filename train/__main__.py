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
    args = parser.parse_args()
    if args.command == "init-draft":
        from train.init_draft import init_draft
        path = init_draft(args.target, args.out, args.num_layers, args.block_size, args.markov_rank,
                          args.markov_head_type, args.target_layer_ids, args.mask_token_id, seed=args.seed)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
