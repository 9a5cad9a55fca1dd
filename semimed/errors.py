"""The one exception type users see: a one-line message naming the file, row or key at fault."""


class SemimedError(ValueError):
    """Bad input: the message names the file, row or key, and says what was expected."""


class UnknownNameError(SemimedError, KeyError):
    """An unknown registry name (method, backbone, …); the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
