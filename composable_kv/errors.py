"""Errors raised at the public boundary. Each message names the problem and the fix."""
import argparse

ERROR_PREFIX = "ckv: error: "  # every error a command line reports starts with it


class CkvError(Exception):
    """Base class of every composable-kv error."""


class ConfigError(CkvError, ValueError):
    """A policy file or dict that does not validate.

    Carries the file, the YAML line (where known) and the key path, e.g. `stages[1].budget_tokens`.
    """

    def __init__(self, message: str, *, path: str = "", source: str | None = None, line: int | None = None):
        self.key_path = path
        self.source = source
        self.line = line
        where = source or "<policy>"
        if line is not None:
            where += f":{line}"
        prefix = f"{where}: {path}: " if path else f"{where}: "
        super().__init__(prefix + message)


class CacheFullError(CkvError, RuntimeError):
    """The page pool has too few free pages for a reservation. Nothing was changed."""


class TensorContractError(CkvError, ValueError):
    """A tensor at the public boundary has the wrong dtype, device, shape or layout."""


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (no usage dump), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{ERROR_PREFIX}{message} (see `{self.prog} --help`)\n")
