"""Wire one engine, its loop, metrics and the routes into an ASGI app."""
import logging
from pathlib import Path

from fastapi import FastAPI
from transformers import AutoTokenizer

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from server.app import ServerOptions, build_app
from server.engine_loop import EngineLoop
from server.gpu_stats import GpuStats
from server.metrics import Metrics
from server.prompts import PromptBuilder

log = logging.getLogger("server")


def create_app(config: EngineConfig, served_model_name: str = "", api_key: str = "", max_waiting: int = 256,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    name = served_model_name or Path(config.model).name
    metrics = Metrics(name)
    loop = EngineLoop(lambda: LLMEngine(config), metrics, max_waiting)
    engine = loop.engine
    runner = engine.model_runner
    log.info("serving %s on %s: kernels %s, target attention %s, CUDA graphs %s, speculation %s (%s), %d KV blocks",
             name, config.device, config.kernels, runner.attention, "on" if runner.graphs else "off",
             config.spec_method, config.verify_policy, runner.num_blocks)
    gpu = GpuStats.for_engine(engine)
    if gpu:
        metrics.attach_gpu(gpu)
    prompts = PromptBuilder(engine, AutoTokenizer.from_pretrained(config.model), name)
    return build_app(loop, prompts, ServerOptions(name, api_key, max_body_bytes))
