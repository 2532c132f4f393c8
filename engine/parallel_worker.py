"""`python -m engine.parallel_worker RANK INIT_METHOD PARENT_PID CONFIG`: a local tensor-parallel rank, started by
engine/parallel_launch.py (CONFIG is the engine's EngineConfig, pickled and base64-encoded)."""
import base64
import pickle
import sys

from engine.parallel_launch import worker_main

if __name__ == "__main__":
    rank, init_method, parent, payload = sys.argv[1:]
    worker_main(int(rank), pickle.loads(base64.b64decode(payload)), init_method, int(parent))
