"""Builds and loads our C++ CPU kernels (kernels/csrc/*.cpp, one extension module) for x86 CPUs with AVX2 + FMA (and
AVX512-BF16, used where the CPU has it: kernels/csrc/bf16_linear_avx512.cpp).

The build goes to $DSPARK_KERNEL_CACHE (default ~/.cache/dspark-kernels)/<name>-<torch>-<python>-<hash of sources and
flags>/ and needs a C++ compiler (g++; $CXX is honoured) and ninja (system ninja, or `pip install ninja`). The first
use on a machine compiles (~1 min); later processes import the cached library directly (no compiler or ninja
needed, a few ms). available() never raises: it returns False when the CPU lacks avx2/fma/f16c, the platform is not
x86-64 Linux, DSPARK_DISABLE_CPU_KERNELS=1 is set, or the build fails (the reason is kept in `load_error()`). A failed
compile is remembered in <build dir>/BUILD_FAILED so later processes don't retry it (delete that file, e.g. after
installing a compiler, to try again); a missing ninja is not remembered. The kernels' Python faces are
kernels/cpu_linear.py, kernels/cpu_ops.py and
kernels/quant_linear.py.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

_NAME = "dspark_cpu_kernels"
_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = [_CSRC / name for name in ("bf16_linear.cpp", "bf16_linear_avx512.cpp", "decode_ops.cpp", "quant_linear.cpp",
                                       "quant_linear_avx512.cpp", "quant_packed_avx512.cpp", "bindings.cpp")]
_HEADERS = [_CSRC / name for name in ("decode_ops.h", "bf16_linear_avx512.h", "hsum.h", "weight_prefetch.h",
                                       "quant_linear.h", "quant_rows.inc")]
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
_FAILED_MARKER = "BUILD_FAILED"

_lock = threading.Lock()
_module = None
_error: str | None = None
_tried = False


def _cpu_supported() -> tuple[bool, str]:
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"unsupported platform {sys.platform}/{platform.machine()}"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    missing = [fl for fl in _REQUIRED_CPU_FLAGS if fl not in flags]
                    return (not missing), (f"CPU lacks {', '.join(missing)}" if missing else "")
    except OSError as e:
        return False, f"cannot read /proc/cpuinfo: {e}"
    return False, "no flags line in /proc/cpuinfo"


def _build_dir() -> Path:
    """One directory per (source, flags, torch, python): a built library found there is known to be current."""
    root = Path(os.environ.get("DSPARK_KERNEL_CACHE", Path.home() / ".cache" / "dspark-kernels"))
    source = b"".join(src.read_bytes() for src in _SOURCES + _HEADERS)
    tag = hashlib.sha1(source + " ".join(_CFLAGS + _LDFLAGS).encode()).hexdigest()[:12]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return root / f"{_NAME}-torch{torch.__version__.replace('+', '_')}-{py}-{tag}"


def _import_built(build_dir: Path):
    """Import an already-built extension directly (no ninja/compiler needed); None if there is none."""
    import importlib.machinery
    import importlib.util

    lib = build_dir / f"{_NAME}.so"
    if not lib.exists():
        return None
    try:
        spec = importlib.util.spec_from_file_location(
            _NAME, lib, loader=importlib.machinery.ExtensionFileLoader(_NAME, str(lib)))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    except Exception:  # e.g. a half-written library from an interrupted build: rebuild below
        return None


def _ensure_ninja() -> None:
    """torch's JIT builder looks for `ninja` on PATH; the pip `ninja` package (e.g. in a venv that is not activated)
    puts its binary elsewhere, so add that directory to PATH if needed."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # type: ignore

        candidates.insert(0, Path(ninja.BIN_DIR))
    except Exception:
        pass
    for d in candidates:
        if (d / "ninja").exists():
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def _load():
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        try:
            if os.environ.get("DSPARK_DISABLE_CPU_KERNELS", "") not in ("", "0"):
                raise RuntimeError("disabled by DSPARK_DISABLE_CPU_KERNELS")
            ok, why = _cpu_supported()
            if not ok:
                raise RuntimeError(why)
            build_dir = _build_dir()
            _module = _import_built(build_dir)
            if _module is None:
                failed = build_dir / _FAILED_MARKER
                if failed.exists():
                    raise RuntimeError(f"an earlier build failed (delete {failed} to retry): "
                                       f"{failed.read_text(errors='replace')[-2000:]}")
                _ensure_ninja()
                from torch.utils import cpp_extension

                cpp_extension.verify_ninja_availability()  # missing ninja: not cached as a failed build
                build_dir.mkdir(parents=True, exist_ok=True)
                try:
                    _module = cpp_extension.load(name=_NAME, sources=[str(src) for src in _SOURCES],
                                                 extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                                                 build_directory=str(build_dir), verbose=False)
                except Exception as e:  # remember it, so every later process doesn't spend a minute failing again
                    try:
                        failed.write_text(f"{type(e).__name__}: {e}")
                    except OSError:
                        pass
                    raise
        except BaseException as e:  # noqa: BLE001 -- compiler errors surface as various types; never raise here
            if isinstance(e, KeyboardInterrupt):
                raise
            _module, _error = None, f"{type(e).__name__}: {e}"
        _tried = True
        return _module


def available() -> bool:
    """True when the kernel is usable here (compiling it on the first call if needed). Never raises."""
    try:
        return _load() is not None
    except Exception:  # pragma: no cover
        return False


def load_error() -> str | None:
    """Why available() is False (None if it is True or was not asked yet)."""
    return _error


def module():
    """The loaded extension; raises RuntimeError naming the reason if not available()."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"cpu kernels unavailable: {_error}")
    return mod
