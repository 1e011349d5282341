"""Exception types: every one names the problem and the fix in its message (one line)."""


class DualbladeError(Exception):
    """Base of dualblade's own errors."""


class ConfigError(DualbladeError, ValueError):
    """A bad argument value: a budget, a policy, a path, a context size, a cache type."""


class ModelError(DualbladeError, ValueError):
    """The model file is missing, not GGUF, truncated or unusable."""


class BudgetError(ConfigError):
    """The memory budget is below the minimum working set of the chosen policy."""
