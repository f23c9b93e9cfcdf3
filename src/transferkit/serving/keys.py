"""The API keys a server accepts, and how they rotate without a restart.

`TRANSFERKIT_API_KEY` or the file `TRANSFERKIT_API_KEY_FILE` names them: one key, or several, one per line (or
separated by commas). Several are for a rotation: put the new key beside the old one, move the clients to it,
then remove the old one. A key read from a file is re-read when the file changes (checked at most once a
second, on the next request), so a Kubernetes Secret mounted as a volume, which the kubelet updates in place,
rotates the keys of a running pod; `transferkit serve --api-key-file` passes its file to the workers for the
same reason. A file that disappears or turns empty while it is being replaced keeps the keys already read.

Every key is compared in constant time (hmac.compare_digest), and all of them each time, so neither a key nor
which of the keys matched can be read from response times.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import time
from collections.abc import Mapping

from transferkit.errors import ConfigError
from transferkit.serving.settings import ServingSettings, api_key_file_in_use, read_api_key_file

logger = logging.getLogger("transferkit.serving")
RELOAD_S = 1.0
_SEPARATORS = re.compile(r"[\n,]")


def parse_keys(text: str | None) -> tuple[str, ...]:
    """The keys in a setting or a key file: one per line or comma-separated, surrounding space removed."""
    return tuple(k.strip() for k in _SEPARATORS.split(text or "") if k.strip())


class KeyRing:
    def __init__(self, text: str | None, path: str | None = None) -> None:
        self.keys = parse_keys(text)
        self.path = path
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    @classmethod
    def for_worker(cls, settings: ServingSettings, env: Mapping[str, str] | None = None) -> KeyRing:
        """The worker's keys: the settings' (read from the file at start when one was named), and the file to
        follow when the keys came from one (an explicit TRANSFERKIT_API_KEY wins over the file, as in settings)."""
        path = api_key_file_in_use(os.environ if env is None else env) if settings.api_key else None
        return cls(settings.api_key, path)

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def accepts(self, authorization: str) -> bool:
        """Whether an `Authorization` header carries one of the keys as `Bearer KEY`."""
        self._reload_if_changed()
        scheme, _, given = authorization.partition(" ")
        presented = given.strip().encode()
        matched = False
        for key in self.keys:  # every key, every time: which one matched takes no longer to find out
            matched |= hmac.compare_digest(presented, key.encode())
        return scheme.lower() == "bearer" and matched

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if not self.path:
            return None
        try:
            st = os.stat(self.path)  # follows the symlink a mounted Secret swaps on update
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _reload_if_changed(self) -> None:
        if not self.path or time.monotonic() - self._checked < RELOAD_S:
            return
        self._checked = time.monotonic()
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return
        try:
            keys = parse_keys(read_api_key_file(self.path))
        except ConfigError as exc:  # mid-update (empty, unreadable): keep serving with the keys we have
            logger.warning("API key file not reloaded, the previous keys stay: %s", exc)
            return
        self.keys, self._stamp = keys, stamp
        logger.info("API keys reloaded from %s: %d key(s)", self.path, len(keys))
