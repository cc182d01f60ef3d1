-- mvalve-async schema for SQLite >= 3.16 (one file shared by the processes of one host).
-- The queue opens it in WAL mode and claims rows in BEGIN IMMEDIATE transactions.
-- Times are integer microseconds since the epoch. `mvalve create --print` shows
-- this file rendered with your table names. AUTOINCREMENT keeps ids from being
-- reused after the newest row is deleted.
-- Compatibility surface: every process and version reads and writes these columns;
-- changing them needs a migration (and a note in the README's upgrade section).

-- section: lane
CREATE TABLE IF NOT EXISTS {table} (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  destination TEXT    NOT NULL,
  message     BLOB    NOT NULL,
  created     INTEGER NOT NULL,
  lease_until INTEGER NOT NULL DEFAULT 0,
  lease_token INTEGER NOT NULL DEFAULT 0,
  deliveries  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS {table}_destination ON {table} (destination);

-- section: timed
CREATE TABLE IF NOT EXISTS {table} (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  destination TEXT    NOT NULL,
  ready       INTEGER NOT NULL,
  message     BLOB    NOT NULL,
  created     INTEGER NOT NULL,
  lease_until INTEGER NOT NULL DEFAULT 0,
  lease_token INTEGER NOT NULL DEFAULT 0,
  deliveries  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS {table}_ready ON {table} (ready);
CREATE INDEX IF NOT EXISTS {table}_destination_ready ON {table} (destination, ready, created);

-- section: dead
CREATE TABLE IF NOT EXISTS {table} (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  lane        TEXT    NOT NULL,
  destination TEXT    NOT NULL,
  message     BLOB    NOT NULL,
  reason      TEXT    NOT NULL,
  deliveries  INTEGER NOT NULL DEFAULT 0,
  died_at     INTEGER NOT NULL
);
