"""The analysis' user error."""


class AnalysisError(ValueError):
    """A bad input to `saewb analyze` (missing folder, width mismatch, unknown hook); one line, no traceback."""
