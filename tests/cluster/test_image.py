"""The cluster image cannot drift from the project: cluster/Dockerfile's base runs the pinned Ray with the GPU
lock's CUDA, the GPU lock has the CPU lock's pins, and every config and doc names the image the Dockerfile
documents building. Reads files only (no docker)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with tomllib (Python 3.11+)")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
CPU_LOCK, GPU_LOCK = ROOT / "requirements" / "cpu.txt", ROOT / "requirements" / "gpu.txt"
IMAGE = re.compile(r"ghcr\.io/linearard/linearard:[\w.-]+")
CPU_ONLY = {"pytest"}  # the image runs jobs, not the test suite
CUDA_BUILD = {"torch", "triton"}  # torch's CUDA build, and the Triton that build requires


def pins(lock: Path) -> dict[str, Requirement]:
    """``{name: Requirement}`` of a requirements file (comments and pip options such as --extra-index-url left out)."""
    lines = (line.split("#")[0].strip() for line in lock.read_text().splitlines())
    requirements = [Requirement(line) for line in lines if line and not line.startswith("-")]
    return {r.name: r for r in requirements}


def pinned_version(requirement: Requirement) -> Version:
    (spec,) = requirement.specifier
    assert spec.operator == "==", f"{requirement} is not pinned exactly"
    return Version(spec.version)


def base_image() -> dict[str, str]:
    """The Dockerfile's one ``FROM`` as ``{"ray", "python", "cuda"}`` (``rayproject/ray:2.60.0-py311-cu129``)."""
    (base,) = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    match = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<python>3\d+)-cu(?P<cuda>\d+)", base)
    assert match, f"base image {base!r} is not a rayproject/ray:<version>-py3XX-cuXXX tag"
    return match.groupdict()


def built_image() -> str:
    """The tag the Dockerfile's header says to build, and to push."""
    text = DOCKERFILE.read_text()
    (tag,) = re.findall(r"docker build -f cluster/Dockerfile -t (\S+) \.$", text, flags=re.MULTILINE)
    assert f"docker push {tag}" in text
    return tag


def yaml_images(node) -> list[str]:
    """Every value of an ``image`` key in a parsed YAML document, at any depth."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image"] + [i for v in node.values() for i in yaml_images(v)]
    if isinstance(node, list):
        return [i for v in node for i in yaml_images(v)]
    return []


def test_base_image_runs_the_pinned_ray_on_the_gpu_locks_cuda():
    base = base_image()
    for lock in (CPU_LOCK, GPU_LOCK):
        assert str(pinned_version(pins(lock)["ray"])) == base["ray"], lock.name
    torch = pinned_version(pins(GPU_LOCK)["torch"])
    assert torch.local == f"cu{base['cuda']}", "the image's torch is the CUDA build of the base image's CUDA"
    assert f"/whl/cu{base['cuda']}" in GPU_LOCK.read_text(), "the GPU lock takes torch from that build's index"
    rayjob = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == base["ray"]


def test_gpu_lock_has_the_cpu_locks_pins():
    cpu, gpu = pins(CPU_LOCK), pins(GPU_LOCK)
    assert set(gpu) == set(cpu) - CPU_ONLY
    for name in set(gpu) - CUDA_BUILD:
        assert gpu[name] == cpu[name], name
    assert pinned_version(gpu["torch"]).public == pinned_version(cpu["torch"]).public
    pinned_version(gpu["triton"])


def test_eval_extra_is_the_locked_lm_eval():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (lm_eval,) = map(Requirement, extras["eval"])
    pinned_version(lm_eval)
    for lock in (CPU_LOCK, GPU_LOCK):
        assert pins(lock)["lm-eval"] == lm_eval, lock.name


def test_configs_and_docs_name_the_image_the_dockerfile_builds():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    tag = built_image()
    assert tag == f"ghcr.io/linearard/linearard:{version}-cu{base_image()['cuda']}"
    images = {name: yaml_images(yaml.safe_load((ROOT / "cluster" / name).read_text()))
              for name in ("rayjob.yaml", "ray-cluster.yaml")}
    assert images == {"rayjob.yaml": [tag, tag], "ray-cluster.yaml": [tag]}  # head and workers; docker.image
    texts = [*(ROOT / "cluster").rglob("*.yaml"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    named = {path.relative_to(ROOT).as_posix(): set(IMAGE.findall(path.read_text())) for path in texts}
    assert {name: images for name, images in named.items() if images - {tag}} == {}
    assert tag in IMAGE.findall((ROOT / "docs" / "pipeline.md").read_text()), "the docs say how to build and push it"
