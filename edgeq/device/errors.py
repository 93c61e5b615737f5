"""The device package's exceptions; each ends up in a result or answer as a kind and one line."""


class RunnerError(Exception):
    """A problem the runner reports in its result JSON (missing runtime, bad input...)."""


class RuntimeMissing(RunnerError):
    """The artifact's runtime is not importable on this device."""


class InferenceFailed(RunnerError):
    """The runtime loaded the model but failed while running it (a kernel's check on the data it was given)."""
