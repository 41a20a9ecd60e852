"""The environment is the lock: what `make` installed is exactly locks/main.txt, and the lock satisfies
requirements.txt (so a requirement changed without `make lock` fails here, not on a user's machine)."""
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
INSTALLED_LOCK = Path(sys.prefix) / "lock.txt"  # what the Makefile installed this environment from


def pins(lock_file: Path) -> dict[str, Version]:
    entries = (line.split("==") for line in lock_file.read_text().splitlines() if line and not line.startswith("#"))
    return {canonicalize_name(name): Version(version) for name, version in entries}


def without_local_label(version: str) -> Version:
    return Version(Version(version).public)  # torch 2.13.0+cpu is the lock's torch 2.13.0


def test_the_lock_satisfies_the_requirements():
    locked = pins(REPO / "locks" / "main.txt")
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            assert name in locked, f"{requirement.name} is required but not locked: run make lock"
            assert requirement.specifier.contains(locked[name], prereleases=True), \
                f"locks/main.txt has {requirement.name} {locked[name]}, outside {requirement}: run make lock"


@pytest.mark.skipif(not INSTALLED_LOCK.is_file(), reason="this environment was not made by `make` from a lock")
def test_the_environment_holds_exactly_the_locked_versions():
    installed_lock = pins(INSTALLED_LOCK)
    main_lock = pins(REPO / "locks" / "main.txt")
    assert {name: v for name, v in main_lock.items() if name in installed_lock or name != "torch"} == installed_lock, \
        "the environment was made from another lock than locks/main.txt: run make setup again"
    for name, version in installed_lock.items():
        assert without_local_label(metadata.version(name)) == version, f"{name} is not the locked {version}"
