"""Errors simcolo raises for bad input. Each message names the file, row or key and what was expected."""


class SimcoloError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class TraceError(SimcoloError):
    """A trace file is missing, malformed, or violates the workload contract."""


class TableError(SimcoloError):
    """A calibration/cost table directory is missing, malformed or of another schema version."""


class ConfigError(SimcoloError):
    """A configuration value is invalid or the configured system cannot exist (e.g. does not fit memory)."""
