"""Errors a user can act on. Each message names the file, tensor or key and what was expected."""


class EdgeMoeError(Exception):
    """Base of every error edgemoe reports to a user (printed as one line by the CLI)."""


class ConvertError(EdgeMoeError):
    """The checkpoint cannot be converted (bad input, unsupported architecture, disk full...)."""


class ShardSetError(EdgeMoeError):
    """A shard set is missing, corrupt, or does not match its manifest."""


class UnsupportedArchitecture(EdgeMoeError):
    """The architecture has no converter / graph; the message lists the supported ones."""


class BudgetError(EdgeMoeError):
    """A memory budget cannot be met; the message states the minimum that can run."""


class ContextOverflow(EdgeMoeError):
    """A prompt or generation does not fit the context window."""
