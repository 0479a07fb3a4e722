"""Build hook (everything else is in pyproject.toml): ship the repository's top-level ``conf/`` (the Hydra
configs) and ``traces/`` (the public traces and their SOURCES.md, the licence's attribution) inside the
wheel as ``simcolo/conf/`` and ``simcolo/traces/``, so that a plain ``pip install`` runs anywhere.

They stay at the top level of the repository (where the README, the tests and the configs' own
``traces/...`` paths name them); ``simcolo.paths`` finds the packaged copy when there is one and the
checkout's otherwise (an editable install reads the checkout, so nothing here runs for it). The files
are added to ``build_py``'s package data, so they are in its outputs (the wheel's RECORD, a strict
editable install's links) and in the sdist like any package data.
"""
from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

#: top-level directory -> the files of it the wheel ships (globs, recursive)
SHIPPED = {"conf": ("**/*.yaml",), "traces": ("**/*",)}   # hidden files (.gitattributes) are left out
PACKAGE = "simcolo"
ROOT = Path(__file__).resolve().parent


def shipped_files() -> list[str]:
    """Every shipped file, relative to the repository root (``conf/model/tiny.yaml``), sorted."""
    files = set()
    for top, patterns in SHIPPED.items():
        for pattern in patterns:
            files.update(p.relative_to(ROOT).as_posix() for p in (ROOT / top).glob(pattern)
                         if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ROOT).parts))
    return sorted(files)


class BuildPyWithShipped(build_py):
    """``build_py`` whose package data also holds the shipped files, under ``simcolo/``."""

    def _shipped_data(self) -> tuple[str, str, str, list[str]]:
        files = shipped_files()
        missing = [top for top in SHIPPED if not any(f.startswith(f"{top}/") for f in files)]
        if missing:
            raise RuntimeError(f"setup.py: nothing to ship in {missing} under {ROOT}")
        # (package, source dir, build dir, files relative to the source dir): copied to build/simcolo/conf/...
        # A PEP 517 build runs in the source tree: relative names keep the sdist's file list relative.
        src = "" if Path.cwd().resolve() == ROOT else str(ROOT)
        return PACKAGE, src, str(Path(self.build_lib, PACKAGE)), files

    def _get_data_files(self):
        return [*super()._get_data_files(), self._shipped_data()]

    def get_data_files_without_manifest(self):
        return [*super().get_data_files_without_manifest(), self._shipped_data()]


setup(cmdclass={"build_py": BuildPyWithShipped})
