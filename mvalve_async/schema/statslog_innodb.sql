-- mvalve-async stats log for MySQL >= 8.0 / MariaDB >= 10.6 (opt-in: mvalve_async.ops.statslog).
-- One row per (destination, action, minute): `minute` is the epoch minute
-- (floor(unix time / 60)), `count` how many events of that action the processes
-- logging to this table saw in it. Writers add to it with
-- INSERT ... ON DUPLICATE KEY UPDATE, one statement per flush.
-- Compatibility surface: every process and version reads and writes these columns;
-- changing them needs a migration (and a note in the README's upgrade section).

-- section: statslog
CREATE TABLE IF NOT EXISTS `{table}` (
  `destination` VARCHAR(255) NOT NULL,
  `action`      VARCHAR(32) NOT NULL,
  `minute`      BIGINT NOT NULL,
  `count`       BIGINT UNSIGNED NOT NULL DEFAULT 0,
  PRIMARY KEY (`destination`, `action`, `minute`),
  KEY `minute` (`minute`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
