"""User-facing errors of the pipelines stage (eval, generate, export): one readable line each."""
from cache.errors import FFError


class EvalError(FFError):
    """A run folder, evaluation file or option the user can fix; the CLI prints it as one line."""
