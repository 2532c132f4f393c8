"""`python -m server` / `dspark-serve`: the OpenAI-compatible server (engine flags are those of `python -m engine`)."""
import argparse
import logging
import signal
import sys

import uvicorn

from engine.cli import add_engine_args, config_from_args
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
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
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
