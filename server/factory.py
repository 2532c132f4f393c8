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
    d = engine.describe()
    log.info("serving %s on %s: kernels %s, target attention %s, CUDA graphs %s, speculation %s%s, %d KV blocks",
             name, d["device"], d["kernels"], d["attention"], "on" if d["cuda_graphs"] else "off", d["speculation"],
             f" ({d['verify_policy']})" if d["verify_policy"] else "", d["kv_blocks"])
    log.info("sampling defaults for requests that set none: %s", sampling_defaults_line(d["sampling_defaults"]))
    gpu = GpuStats.for_device(d["device"])
    if gpu:
        metrics.attach_gpu(gpu)
    prompts = PromptBuilder(engine, AutoTokenizer.from_pretrained(config.model), name)
    return build_app(loop, prompts, ServerOptions(name, api_key, max_body_bytes))


def sampling_defaults_line(defaults: dict) -> str:
    given = ", ".join(f"{k}={v}" for k, v in defaults.items())
    if not given:
        return "OpenAI's (the model's generation_config.json sets none)"
    return f"{given} (the model's generation_config.json; the rest OpenAI's)"
