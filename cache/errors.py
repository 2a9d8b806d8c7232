"""User-facing errors of the cache stage: each one is a single readable line."""


class FFError(Exception):
    """An error the user can cause and fix; the CLI prints it as one line and exits non-zero."""


class ModelError(FFError):
    """The model spec cannot be resolved or loaded."""


class CorpusError(FFError):
    """A corpus spec cannot be read or holds too few tokens."""


class StoreError(FFError):
    """A store is missing, incomplete, corrupt or was built with other arguments."""
