"""User-facing error types that callers catch without importing what raises them.

The CLI lists them (``workflows.config.USER_ERRORS``) before it knows which command runs, so
they live here, away from torch (``mlcore.train``) and pyarrow (``mlcore.data.manifest``), and
``cpsd`` answers a mistyped argument without loading either.
"""


class ManifestError(ValueError):
    """A dataset directory or its rows do not follow the format."""


class ResumeMismatchError(ValueError):
    """``out_dir`` holds the checkpoint of a run with another fingerprint (another config)."""
