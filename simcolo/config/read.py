"""Reading one config node: typed getters whose errors name the full key, and a check for unknown keys.

Every error is a :class:`~simcolo.errors.ConfigError` of one line, in the project's style:
``serving.tp must be >= 1, got 0``, ``seed must be an integer, got 'abc'``,
``serving.max_num_seq is not a known key (did you mean serving.max_num_seqs?); known keys of serving: ...``.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from simcolo.errors import ConfigError

_REQUIRED = object()


def join(prefix: str, key: str) -> str:
    """The full dotted name of ``key`` under ``prefix`` (``""``: the top level)."""
    return f"{prefix}.{key}" if prefix else key


def mapping(node: Any, key: str) -> Mapping:
    """``node`` if it is a mapping (a DictConfig or a dict), else a ConfigError naming ``key``."""
    if not isinstance(node, Mapping):
        raise ConfigError(f"{key or 'the config'} must be a mapping of keys, got {node!r}")
    return node


def check_known(node: Mapping, prefix: str, known: Iterable[str], ignore: Iterable[str] = (), where: str = "") -> None:
    """Refuse a key of ``node`` that is not in ``known`` (a typo that Hydra's ``+key=value`` lets through),
    naming it, the closest known key and every known key. ``where`` qualifies the known keys when they
    depend on another value (``" with workload.kind=trace"``)."""
    known = sorted(set(known))
    skip = set(ignore)
    for key in node.keys():
        key = str(key)
        if key in known or key in skip:
            continue
        close = difflib.get_close_matches(key, known, n=1) or \
            [k for k in known if k.startswith(key) or key.startswith(k)][:1]
        hint = f" (did you mean {join(prefix, close[0])}?)" if close else ""
        raise ConfigError(f"{join(prefix, key)} is not a known key{hint}; known keys of "
                          f"{prefix or 'the config'}{where}: {', '.join(known)}")


class Group:
    """One node being read. ``Group(cfg["serving"], "serving").int("tp", min=1)`` returns the value as an
    ``int`` or raises ``serving.tp must be >= 1, got 0``."""

    def __init__(self, node: Any, prefix: str):
        self.node = mapping(node, prefix)
        self.prefix = prefix

    def key(self, name: str) -> str:
        return join(self.prefix, name)

    def check_known(self, known: Iterable[str], ignore: Iterable[str] = (), where: str = "") -> None:
        check_known(self.node, self.prefix, known, ignore, where)

    def raw(self, name: str, default: Any = _REQUIRED) -> Any:
        """The value as composed (interpolations resolved); ``default`` if absent, else an error."""
        try:
            if name not in self.node:
                if default is _REQUIRED:
                    raise ConfigError(f"{self.key(name)} is missing")
                return default
            return self.node[name]
        except OmegaConfBaseException as exc:   # a broken interpolation (a ??? value reads as absent)
            raise ConfigError(f"{self.key(name)} cannot be read: {str(exc).splitlines()[0]}") from exc

    def sub(self, name: str) -> "Group":
        return Group(self.raw(name), self.key(name))

    # ------------------------------------------------------------------ typed values
    # ``default``: the value when the key is absent (without one, an absent key is an error)
    def int(self, name: str, *, min: int | None = None, optional: bool = False, default: Any = _REQUIRED
            ) -> int | None:
        value = self.raw(name, default)
        if value is None and optional:
            return None
        n = to_int(value, self.key(name), optional)
        if min is not None and n < min:
            raise ConfigError(f"{self.key(name)} must be >= {min}{_or_null(optional)}, got {n}")
        return n

    def float(self, name: str, *, gt: float | None = None, ge: float | None = None,
              optional: bool = False, default: Any = _REQUIRED) -> float | None:
        value = self.raw(name, default)
        if value is None and optional:
            return None
        x = to_float(value, self.key(name), optional)
        if gt is not None and not x > gt:
            raise ConfigError(f"{self.key(name)} must be > {gt:g}{_or_null(optional)}, got {x:g}")
        if ge is not None and not x >= ge:
            raise ConfigError(f"{self.key(name)} must be >= {ge:g}{_or_null(optional)}, got {x:g}")
        return x

    def fraction(self, name: str, interval: str, optional: bool = False) -> float | None:
        """A float in ``interval``, one of ``(0, 1)``, ``(0, 1]``, ``[0, 1)``."""
        value = self.raw(name)
        if value is None and optional:
            return None
        x = to_float(value, self.key(name), optional)
        lo_ok = x > 0 if interval[0] == "(" else x >= 0
        hi_ok = x < 1 if interval[-1] == ")" else x <= 1
        if not (lo_ok and hi_ok):
            raise ConfigError(f"{self.key(name)} must be in {interval}, got {x:g}")
        return x

    def bool(self, name: str) -> bool:
        value = self.raw(name)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)} must be true or false, got {value!r}")
        return value

    def str(self, name: str, *, optional: bool = False) -> str | None:
        value = self.raw(name)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ConfigError(f"{self.key(name)} must be a string{_or_null(optional)}, got {value!r}")
        return str(value)

    def choice(self, name: str, options: Iterable[str], default: Any = _REQUIRED) -> str:
        """One of ``options``: ``workload.overlength 'cut' is unknown; expected one of: reject, clip``."""
        value = self.raw(name, default)
        options = tuple(options)
        if value not in options:
            raise ConfigError(f"{self.key(name)} {value!r} is unknown; expected one of: {', '.join(options)}")
        return value


def _or_null(optional: bool) -> str:
    return " or null" if optional else ""


def to_int(value: Any, key: str, optional: bool = False) -> int:
    """An int (or a float with an integral value, as Hydra parses ``2.0``); not a bool, not a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{key} must be an integer{_or_null(optional)}, got {value!r}")
    return int(value)


def to_float(value: Any, key: str, optional: bool = False) -> float:
    """A finite float from a number, or from a string a YAML 1.1 reader left unparsed (``5e9``)."""
    bad = ConfigError(f"{key} must be a number{_or_null(optional)}, got {value!r}")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise bad from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad
    return float(value)


def read_seed(root: Mapping) -> int:
    """The top-level ``seed``: an integer >= 0 (numpy's generators are seeded from it)."""
    return Group(root, "").int("seed", min=0)
