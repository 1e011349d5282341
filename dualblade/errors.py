"""Exception types: every one names the problem and the fix in its message (one line)."""


class DualbladeError(Exception):
    """Base of dualblade's own errors."""


class ConfigError(DualbladeError, ValueError):
    """A bad argument value: a budget, a policy, a path, a context size, a cache type."""


class ModelError(DualbladeError, ValueError):
    """The model file is missing, not GGUF, truncated or unusable."""


class BudgetError(ConfigError):
    """The memory budget is below the minimum working set of the chosen policy."""


class StoreError(ConfigError):
    """The KV directory or device cannot hold the KV: missing, not writable, on tmpfs, too small or without
    room, mounted, or holding something that is not ours (raised before any weight is loaded)."""


class SessionError(StoreError):
    """A saved session cannot be written or used: not a session file, truncated, damaged, of a newer format,
    saved with another model or KV geometry, a symlink at the path, no room on the disk. Raised before the
    context changes (a failed load leaves it empty)."""


class KVIOError(DualbladeError, OSError):
    """Reading or writing an offloaded KV layer failed, or data read back failed its checksum.

    Nothing computed from the damaged cache is returned: every call that would use it raises this
    until reset() (which a completion with a prompt that shares no prefix also does) clears the
    cache, or close()."""

    def __init__(self, detail: str, fix: str):
        super().__init__(f"{detail}; {fix}")
        self.detail = detail  # what failed, in the C module's words


class EvalAborted(DualbladeError):
    """Llama.abort_eval() stopped an evaluation mid-way: the tokens of the batch it was computing are not in the
    context (the ones before are); evaluate them again to go on."""


class FlashAttentionWarning(UserWarning):
    """Flash attention was switched on because offloaded KV layers need it (V untransposed), though the caller
    did not ask for it (llama_cpp's default is off) or asked for it off. Pass flash_attn=True to silence it."""


class PinnedMemoryWarning(UserWarning):
    """The VRAM tier's host memory (its read-ahead ring, write-back buffer, pinned host copies) could not be
    page-locked (RLIMIT_MEMLOCK, a container's limit): copies to the GPU run from pageable memory, through CUDA's
    own staging, slower; the outputs are the same. kv_stats()["vram"]["pin_failed"] says why."""
