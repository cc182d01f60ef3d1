"""The connection holders the dialects run on, for other layers that need their own
connection to the queue's database (ops/statslog: its table lives beside the queue's).

`MySQLPool` (innodb, q4m: one holder per pooled connection, retries, failover) and
`open_sqlite` (the sqlite dialect's connection, WAL and busy timeout). Importing this
module imports aiomysql and aiosqlite; import it where it is used, as the registry
imports a dialect.
"""

from __future__ import annotations

from ._mysql import MySQLPool
from ._sqlite_conn import open_sqlite

__all__ = ["MySQLPool", "open_sqlite"]
