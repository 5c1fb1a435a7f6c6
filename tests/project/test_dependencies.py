"""Declared dependencies against the code and the lock files.

pyproject.toml lists every dependency once: ``dependencies`` is the serving set (what
recsys_serving imports; ``recsys[serving]`` names it and adds nothing), the ``pipeline``
extra adds Dagster and the training stack, ``dev`` the tools, ``all`` both extras. The
lock files pin them: requirements.lock (base + pipeline + dev) is what ``make install``
and CI install, requirements-runtime.lock (base + pipeline) what the Dagster and
collector images install, requirements-serving.lock (base alone) what the serving image
installs. A mismatch fails here with the fix to make (usually
``make lock``). deptry (``make lint``) checks the other direction: every import declared,
every declaration used.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PYPROJECT["optional-dependencies"]
LOCK = ROOT / "requirements.lock"
SERVING_LOCK = ROOT / "requirements-serving.lock"
RUNTIME_LOCK = ROOT / "requirements-runtime.lock"
TRAINING_STACK = {"dagster", "dagster-webserver", "great-expectations", "implicit"}
_PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", re.M)


def pins(lock: Path) -> dict[str, str]:
    return {canonicalize_name(name): version for name, version in _PIN.findall(lock.read_text())}


def requirements(lines: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in parsed}


def test_the_base_install_is_the_serving_set_and_the_extras_add_the_rest() -> None:
    """`pip install recsys[serving]` must never pull in Dagster: pip extras only add, so
    the base `dependencies` are the serving set and everything else is an extra."""
    base = requirements(PYPROJECT["dependencies"])
    pipeline, dev = requirements(EXTRAS["pipeline"]), requirements(EXTRAS["dev"])
    assert EXTRAS["serving"] == [], "`serving` names the base install: it must add nothing"
    assert not base.keys() & TRAINING_STACK, (
        f"the base install pulls {base.keys() & TRAINING_STACK}"
    )
    assert pipeline.keys() >= TRAINING_STACK, "the training stack belongs to the `pipeline` extra"
    assert not base.keys() & pipeline.keys(), "a dependency is both in the base and `pipeline`"
    assert not base.keys() & dev.keys(), "a dependency is both in the base and `dev`"
    assert EXTRAS["all"] == ["recsys[pipeline,dev]"]


def _third_party_imports(package: Path) -> dict[str, str]:
    """Top-level module -> the first file importing it (function-level imports included)."""
    found: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_the_base_dependencies_cover_every_import_of_recsys_serving() -> None:
    """The serving image installs only the base dependencies: anything recsys_serving
    imports, even lazily inside a function, must be in them."""
    serving = set(requirements(PYPROJECT["dependencies"]))
    providers = importlib.metadata.packages_distributions()
    for module, where in _third_party_imports(ROOT / "recsys_serving").items():
        if module == "recsys_serving":
            continue
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists, f"{where} imports {module}, which no installed distribution provides"
        assert dists & serving, (
            f"{where} imports {module} (from {sorted(dists)}): add it to `dependencies` in "
            "pyproject.toml, then `make lock`"
        )


def declared(group: str) -> list[str]:
    return PYPROJECT["dependencies"] if group == "dependencies" else EXTRAS[group]


@pytest.mark.parametrize("group", ["dependencies", "pipeline", "dev"])
def test_the_lock_pins_every_declared_dependency(group: str) -> None:
    locked = pins(LOCK)
    lines = declared(group)
    for name, req in requirements(lines).items():
        assert name in locked, f"{req} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock pins {name}=={locked[name]}, outside {req}: run `make lock`"
        )


@pytest.mark.parametrize(
    ("image_lock", "groups", "left_out"),
    [
        (SERVING_LOCK, ["dependencies"], TRAINING_STACK | {"pytest"}),
        (RUNTIME_LOCK, ["dependencies", "pipeline"], {"pytest", "ruff", "uv"}),
    ],
    ids=["serving", "runtime"],
)
def test_the_image_locks_are_subsets_at_the_versions_of_the_lock(
    image_lock: Path, groups: list[str], left_out: set[str]
) -> None:
    locked, subset = pins(LOCK), pins(image_lock)
    for group in groups:
        for name in requirements(declared(group)):
            assert name in subset, f"{name} is not in {image_lock.name}: run `make lock`"
    differ = {n: (v, locked.get(n)) for n, v in subset.items() if locked.get(n) != v}
    assert not differ, f"{image_lock.name} vs requirements.lock (run `make lock`): {differ}"
    assert not subset.keys() & left_out, f"{image_lock.name} pulls in {subset.keys() & left_out}"


def test_the_lock_holds_nothing_pyproject_dropped() -> None:
    """An entry that only pyproject.toml asked for must still be declared there (a
    dependency removed without `make lock` would otherwise stay installed)."""
    names = set().union(*(requirements(declared(g)) for g in ("dependencies", "pipeline", "dev")))
    for entry in re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text()):
        match = _PIN.match(entry)
        if not match:
            continue
        # uv's annotations: "# via recsys (pyproject.toml)" or "# via" then "#   <who>" lines.
        notes = [line.strip("# ").removeprefix("via").strip() for line in entry.splitlines()]
        via = {note for note in notes[1:] if note and not note.startswith("--hash")}
        if via == {"recsys (pyproject.toml)"}:
            name = canonicalize_name(match[1])
            assert name in names, f"{name} is locked but no longer declared: run `make lock`"


def test_every_lock_entry_has_hashes() -> None:
    for lock in (LOCK, RUNTIME_LOCK, SERVING_LOCK):
        entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text().split("\n", 2)[2])
        for entry in entries:
            if entry.strip() and not entry.startswith("#"):
                assert "--hash=sha256:" in entry, f"{lock.name}: no hash for {entry.split()[0]}"


def test_this_environment_runs_the_locked_versions() -> None:
    """`make install` and CI install requirements.lock: the tests run exactly those
    versions (a venv that drifted is refreshed by `make install`)."""
    drifted = {}
    for name, version in pins(LOCK).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            drifted[name] = (version, installed)
    assert not drifted, f"locked vs installed (run `make install`): {drifted}"
