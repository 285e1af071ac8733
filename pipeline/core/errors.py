"""One error hierarchy, with messages a user can act on.

Every message says what was checked, what was expected, what was found and what to do.
"""

from __future__ import annotations


class NightscoreError(Exception):
    """Base class of every error the pipeline raises on purpose."""


class ConfigError(NightscoreError):
    """A setting is missing or malformed."""


class SourceError(NightscoreError):
    """The warehouse is unreachable, or a source table or column is missing or malformed."""


class DataError(NightscoreError):
    """The data itself violates a contract (empty population, immature labels, ...)."""


class ModelError(NightscoreError):
    """No usable model: missing champion, unknown version, tampered or missing artifact."""


class GateFailed(NightscoreError):
    """A gate stopped the run on purpose; nothing was published. Retrying does not help."""


class PublishError(NightscoreError):
    """Staged predictions failed validation or could not be swapped in."""


class LockTimeout(NightscoreError):
    """One of the pipeline's locks stayed held by another session past its lock timeout."""


def plain(values: object) -> str:
    """Values as a message shows them: ``1761``, never numpy's ``np.int64(1761)``.

    A numpy scalar or array, a pandas Series or a pyarrow array becomes plain Python values
    first; a sequence is its items joined by ", " (dates as 2026-01-05, text unquoted).
    """
    if getattr(getattr(values, "dtype", None), "kind", None) in ("m", "M"):  # datetime64
        values = values.astype(str)  # type: ignore[attr-defined]
    for to_python in ("tolist", "to_pylist", "as_py"):  # numpy, pandas; pyarrow
        if hasattr(values, to_python):
            values = getattr(values, to_python)()
            break
    if isinstance(values, list | tuple):
        return ", ".join(plain(v) for v in values)
    return str(values)
