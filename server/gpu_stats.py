"""GPU utilisation and memory for /metrics, read through NVML (nvidia-ml-py) when the engine runs on CUDA."""
import time

READ_EVERY_S = 1.0  # NVML queries cost ~0.1 ms each; the engine loop syncs metrics every step


class GpuStats:
    def __init__(self, device_index: int):
        import pynvml
        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self.last_read = float("-inf")

    @classmethod
    def for_device(cls, name: str) -> "GpuStats | None":
        """None on CPU, or when NVML is missing (then the GPU gauges stay absent rather than wrong)."""
        import torch
        device = torch.device(name)
        if device.type != "cuda":
            return None
        try:
            return cls(device.index if device.index is not None else torch.cuda.current_device())
        except (ImportError, OSError, RuntimeError):
            return None

    def read(self) -> tuple[float, int, int] | None:
        """(utilisation 0-1, memory used bytes, memory total bytes) at most once per READ_EVERY_S, else None."""
        now = time.monotonic()
        if now - self.last_read < READ_EVERY_S:
            return None
        self.last_read = now
        util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
        memory = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return util.gpu / 100, memory.used, memory.total
