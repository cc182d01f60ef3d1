"""The reader: `Reader` (reader.py) and its engine, private to this package:
the directory of destinations with rows (directory.py), claim rounds that ask the
valve before leasing (claims.py), held leases and their groups (held.py), what
becomes of one when its turn comes (handout.py), and batched acks (acks.py)."""

from .reader import Reader, ReaderOptions

__all__ = ["Reader", "ReaderOptions"]
