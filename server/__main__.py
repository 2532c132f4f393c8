"""`python -m server` / `dspark-serve`: the OpenAI-compatible server (engine flags are those of `python -m engine`)."""
import argparse
import logging
import signal
import sys

import uvicorn

from engine.cli import add_engine_args, config_from_args
from engine.preflight import check_v4_checkpoint, is_v4
from server.factory import create_app


def parse_args(argv=None) -> argparse.Namespace:
    parser = add_engine_args(argparse.ArgumentParser(prog="dspark-serve", description=__doc__))
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default="", help="require 'Authorization: Bearer KEY' on every route but /health")
    parser.add_argument("--served-model-name", default="", help="model id clients send (default: the model dir name)")
    parser.add_argument("--max-waiting", type=int, default=256,
                        help="requests allowed to wait beyond max_num_seqs before answering 503")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--graceful-timeout", type=float, default=30.0,
                        help="seconds to let in-flight requests finish after SIGTERM before aborting them")
    parser.add_argument("--check", action="store_true",
                        help="DeepSeek-V4: check the checkpoint's config, index and tensor headers, print the "
                             "deployment plan, and exit without loading weights (the plan is printed at every start)")
    parser.add_argument("--memory-gb", type=float, default=0.0,
                        help="memory per device in GB for the printed DeepSeek-V4 plan (default: the plan's own)")
    return parser.parse_args(argv)


def preflight(args: argparse.Namespace):
    """A DeepSeek-V4 checkpoint is checked and its plan printed before any weight is read; exit 2 naming the problem
    when the checkpoint does not match its config."""
    if not args.model or not is_v4(args.model):
        if args.check:
            raise SystemExit(f"--check: {args.model or 'the default model'} is not a DeepSeek-V4 checkpoint")
        return
    try:
        print(check_v4_checkpoint(args.model, args.tensor_parallel_size, getattr(args, "expert_parallel", False),
                                  args.memory_gb), flush=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"dspark-serve: the checkpoint in {args.model} cannot be served: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.check:
        raise SystemExit(0)


def main(argv=None):
    args = parse_args(argv)
    preflight(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(config_from_args(args), args.served_model_name, args.api_key, args.max_waiting,
                     args.max_body_bytes)
    engine_loop = app.state.engine_loop
    signal.signal(signal.SIGHUP, lambda *_: engine_loop.request_reload())  # reload the calibration
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=args.graceful_timeout))
    engine_loop.on_fatal = lambda message: setattr(server, "should_exit", True)  # a tensor-parallel rank failed
    server.run()
    if engine_loop.fatal:
        sys.exit(f"dspark-serve: {engine_loop.fatal}")


if __name__ == "__main__":
    main()
