-- mvalve-async stats log for SQLite >= 3.24 (opt-in: mvalve_async.ops.statslog).
-- One row per (destination, action, minute): `minute` is the epoch minute
-- (floor(unix time / 60)), `count` how many events of that action the processes
-- logging to this table saw in it. Writers add to it with
-- INSERT ... ON CONFLICT DO UPDATE, one statement per flush.
-- Compatibility surface: every process and version reads and writes these columns;
-- changing them needs a migration (and a note in the README's upgrade section).

-- section: statslog
CREATE TABLE IF NOT EXISTS {table} (
  destination TEXT    NOT NULL,
  action      TEXT    NOT NULL,
  minute      INTEGER NOT NULL,
  count       INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (destination, action, minute)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS {table}_minute ON {table} (minute);
