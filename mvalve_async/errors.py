"""One exception tree. Driver errors are translated at the edge (queues/, stores/)."""

from __future__ import annotations

__all__ = [
    "CodecError",
    "ConfigError",
    "InvalidMessage",
    "MvalveError",
    "QueueBusy",
    "QueueError",
    "QueueUnavailable",
    "ReaderBusy",
    "SchemaError",
    "StoreError",
]


class MvalveError(Exception):
    """Base class of every error this library raises."""


class ConfigError(MvalveError, ValueError):
    """Bad configuration: unknown URL scheme, bad table name, bad option."""


class InvalidMessage(MvalveError, ValueError):
    """A message refused before anything was written (destination, size, content)."""


class CodecError(MvalveError, ValueError):
    """A stored blob that cannot be decoded (corrupt, unknown version)."""


class QueueError(MvalveError):
    """The queue backend failed."""


class QueueUnavailable(QueueError):
    """The queue server cannot be reached, or refused the credentials."""


class QueueBusy(QueueError):
    """The server rolled the work back (lock wait timeout, deadlock, a cluster's
    certification) again and again, for longer than it is tried again: nothing of
    it was done. Transient: `Reader.next()` waits it out like `QueueUnavailable`."""


class SchemaError(QueueError):
    """The queue tables are missing or do not have the expected shape."""


class StoreError(MvalveError):
    """The state store (memcached) failed or cannot be reached."""


class ReaderBusy(MvalveError, RuntimeError):
    """A reader was awaited by two tasks at once: use one reader per task, or serve()."""
