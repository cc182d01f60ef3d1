"""mvalve-async: an asyncio message valve.

Writers insert messages addressed to a destination; readers take them out so
that no destination receives more than its rate, across any number of reader
processes.
"""

from .errors import (
    CodecError,
    ConfigError,
    InvalidMessage,
    MvalveError,
    QueueError,
    QueueUnavailable,
    ReaderBusy,
    SchemaError,
    StoreError,
)
from .interfaces import Lane, Queue, Store
from .message import Headers, Message
from .pipe import Pipe, open
from .reader import Reader
from .registry import make_queue, make_store
from .throttle import EmergencyPolicy, Rate
from .urls import QueueSettings, StoreSettings, Tables
from .writer import Writer

__version__ = "0.1.0"

__all__ = [
    "CodecError",
    "ConfigError",
    "EmergencyPolicy",
    "Headers",
    "InvalidMessage",
    "Lane",
    "Message",
    "MvalveError",
    "Pipe",
    "Queue",
    "QueueError",
    "QueueSettings",
    "QueueUnavailable",
    "Rate",
    "Reader",
    "ReaderBusy",
    "SchemaError",
    "Store",
    "StoreError",
    "StoreSettings",
    "Tables",
    "Writer",
    "__version__",
    "make_queue",
    "make_store",
    "open",
]
