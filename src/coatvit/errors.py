"""Errors a user can act on. The CLI turns each into one line on stderr and exit code 2."""


class CoaTError(Exception):
    """Base class: the message says what was expected, what came, and what to do."""


class UnknownModelError(CoaTError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightsError(CoaTError):
    """A weight file is unreadable, unsafe, or does not fit the model."""


class PretrainedUnavailableError(WeightsError):
    """Pretrained weights are neither cached nor downloadable."""


class DataError(CoaTError):
    """A dataset folder, image or label set is unusable."""


class ConfigError(CoaTError, ValueError):
    """A run configuration has an unknown key, a wrong type or an impossible value."""
