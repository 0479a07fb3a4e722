"""Where the project's shipped files live, and the one rule for relative paths in configs.

Shipped files: the Hydra configs (``conf/``), the traces (``traces/``) and the cost tables
(``simcolo/costs/tables/``). In the repository ``conf/`` and ``traces/`` sit at the top level; a wheel
carries them inside the package as ``simcolo/conf/`` and ``simcolo/traces/`` (``setup.py`` maps them in
at build time). :data:`CONF_DIR` and :data:`TRACES_DIR` are whichever of the two this installation has:
the packaged copy when there is one (an installed wheel), else the checkout's (an editable install, the
tests).
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
#: The checkout's root in an editable install (tests and the repository's own files use it). For an
#: installed wheel this is ``site-packages``: code that must work installed uses the directories below.
PROJECT_ROOT = _PACKAGE_DIR.parent


def _shipped_dir(name: str) -> Path:
    packaged = _PACKAGE_DIR / name           # an installed wheel: mapped in at build time
    return packaged if packaged.is_dir() else PROJECT_ROOT / name


CONF_DIR = _shipped_dir("conf")
TRACES_DIR = _shipped_dir("traces")
TABLES_DIR = _PACKAGE_DIR / "costs" / "tables"

#: How configs and users name shipped files (``workload.path: traces/AzureLLMInferenceTrace_conv.csv``,
#: ``costs.path=simcolo/costs/tables/<dir>``): the relative prefix and where it lives in this installation.
SHIPPED_PREFIXES: dict[str, Path] = {
    "traces": TRACES_DIR,
    "conf": CONF_DIR,
    "simcolo/costs/tables": TABLES_DIR,
}


def shipped_path(path: str | Path) -> Path | None:
    """The shipped file a relative path names (``traces/<file>``, ``conf/<group>/<file>``,
    ``simcolo/costs/tables/<dir>``) in this installation, or None when it names no shipped prefix."""
    p = Path(path)
    if p.is_absolute():
        return None
    for prefix, directory in SHIPPED_PREFIXES.items():
        parts = Path(prefix).parts
        if p.parts[:len(parts)] == parts:
            return directory.joinpath(*p.parts[len(parts):])
    return None


def resolve_path(path: str | Path) -> Path:
    """Resolve a path a config or a user gives (a trace, ``costs.path``, a learning-curve table).

    The one rule: an absolute path is taken as is; a relative one from the working directory (where the
    user stands) when it exists there; otherwise, when it names a shipped file (``traces/...``,
    ``conf/...``, ``simcolo/costs/tables/...``) that exists, that file inside the installed package (or the
    checkout); otherwise from the working directory again, so that a missing file is reported where the
    user would look for it. The result is always absolute.
    """
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    here = Path.cwd() / p
    if here.exists():
        return here.resolve()
    shipped = shipped_path(p)
    if shipped is not None and shipped.exists():
        return shipped
    return here
