"""Where the project's shipped files live, and how relative paths in configs are resolved."""
from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
TRACES_DIR = PROJECT_ROOT / "traces"
TABLES_DIR = Path(__file__).resolve().parent / "costs" / "tables"


def resolve_path(path: str | Path) -> Path:
    """Resolve a config path: absolute as is; relative against the working directory, else the project root."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if p.exists():
        return p.resolve()
    return PROJECT_ROOT / p
