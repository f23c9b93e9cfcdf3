"""The one exception type users see: a message that names the problem and the fix."""


class TransferkitError(Exception):
    """A user-facing error. The CLI prints it as one line on stderr and exits non-zero."""


class ConfigError(TransferkitError):
    """A bad option or config key, refused before any work starts."""


class DataError(TransferkitError):
    """A dataset that is missing, empty or malformed."""


class ImageDecodeError(TransferkitError):
    """Bytes that are not a decodable image (serving answers these with a 4xx)."""
