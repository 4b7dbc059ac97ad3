"""The error every checkpoint reader raises (defined apart so that each reader module can import it)."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or is not what it was given as. The message says how to fix it."""
