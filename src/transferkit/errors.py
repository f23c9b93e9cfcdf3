"""The one exception type users see: a message that names the problem and the fix; and how any exception is
written on one line (a table cell, a manifest field, the CLI's stderr line)."""


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


def one_line(exc: BaseException, limit: int = 500) -> str:
    """`Type: first line of the message`, cut at `limit` characters: fits one table cell or manifest field, and
    the type says which library failed."""
    lines = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def message_on_one_line(exc: BaseException) -> str:
    """The whole message, its lines joined, without the type: the CLI's stderr stays one line per failure, and a
    TransferkitError's message (problem and fix, sometimes over two lines) is shown whole."""
    return " ".join(str(exc).split())
