"""GPU gauges in /metrics: read through NVML only when the engine runs on CUDA. No GPU here, so NVML is a fake
module with known readings; the CPU engine must add no GPU gauges at all."""
import sys
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from engine.outputs import EngineStats
from server import gpu_stats
from server.gpu_stats import GpuStats
from server.metrics import Metrics


class FakeNvml:
    def __init__(self):
        self.inits, self.reads = 0, 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetUtilizationRates(self, handle):
        self.reads += 1
        return SimpleNamespace(gpu=37)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=5 * 2**30, total=141 * 2**30)


IDLE = EngineStats(num_running=0, num_waiting=0, num_blocks=8, num_free_blocks=8, num_preemptions=0,
                   prefix_queried_tokens=0, prefix_hit_tokens=0)


def gauges(metrics: Metrics) -> dict:
    text = metrics.render().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("dspark:gpu")}


def test_gpu_gauges_come_from_nvml(monkeypatch):
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    stats = GpuStats.for_device("cuda:0")
    assert stats is not None and stats.handle == ("gpu", 0) and nvml.inits == 1
    metrics = Metrics("m")
    metrics.attach_gpu(stats)
    metrics.sync(IDLE)
    assert gauges(metrics) == {"dspark:gpu_utilization_ratio": 0.37, "dspark:gpu_memory_used_bytes": 5 * 2**30,
                               "dspark:gpu_memory_total_bytes": 141 * 2**30}
    metrics.sync(IDLE)  # within READ_EVERY_S: no second NVML query
    assert nvml.reads == 1
    monkeypatch.setattr(gpu_stats, "READ_EVERY_S", 0.0)
    metrics.sync(IDLE)
    assert nvml.reads == 2


def test_cpu_engine_has_no_gpu_gauges(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    assert GpuStats.for_device("cpu") is None
    metrics = Metrics("m")
    metrics.sync(IDLE)
    assert gauges(metrics) == {}


def test_missing_nvml_leaves_gauges_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    assert GpuStats.for_device("cuda:0") is None
