"""The one exception type users see: a message that names the problem and the fix."""


class TransferkitError(Exception):
    """A user-facing error. The CLI prints it as one line on stderr and exits non-zero."""


class ConfigError(TransferkitError):
    """A bad option or config key, refused before any work starts."""


class DataError(TransferkitError):
    """A dataset that is missing, empty or malformed."""


class ImageDecodeError(TransferkitError):
    """Bytes that are not a decodable image (serving answers these with a 4xx)."""

    http_status = 400  # serving maps the error class to a status code, never the message text


class ImageTooLargeError(ImageDecodeError):
    """An image whose header claims more pixels than we decode (it is never decompressed)."""

    http_status = 413


class ImageFormatError(ImageDecodeError):
    """A recognised image format that the caller does not accept (e.g. GIF or TIFF sent to the server)."""

    http_status = 415


class ArtifactMismatchError(TransferkitError):
    """An exported file whose size or sha256 differs from manifest.json (corrupt, truncated or replaced)."""
