"""Errors meant for people: the entrypoints print them as one line and exit with status 2, no traceback."""


class SpectraError(Exception):
    """A problem with the user's config, inputs or environment (not a bug in Spectra)."""


class ConfigError(SpectraError):
    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")
