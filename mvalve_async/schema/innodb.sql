-- mvalve-async schema for MySQL >= 8.0 / MariaDB >= 10.6 (InnoDB, SKIP LOCKED leases).
-- Times are integer microseconds since the epoch. `mvalve create --print` shows
-- this file rendered with your table names.
-- Compatibility surface: every process and version reads and writes these columns;
-- changing them needs a migration (and a note in the README's upgrade section).

-- section: lane
-- KEY destination is (destination, id) in InnoDB: a destination's claim order.
CREATE TABLE IF NOT EXISTS `{table}` (
  id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  destination VARCHAR(255) NOT NULL,
  message     MEDIUMBLOB NOT NULL,
  created     BIGINT NOT NULL,
  lease_until BIGINT NOT NULL DEFAULT 0,
  lease_token BIGINT NOT NULL DEFAULT 0,
  deliveries  INT NOT NULL DEFAULT 0,
  PRIMARY KEY (id),
  KEY destination (destination)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- section: timed
-- KEY destination_ready is a destination's claim order, (ready, created, id): its
-- due rows come without a sort. KEY ready finds the rows come due since a scan.
-- Tables made by 0.1 have a `reserved` column and KEY destination instead: they
-- work as they are, and `ALTER TABLE ... ADD KEY destination_ready (destination,
-- ready, created)` makes claims of a destination with many timed rows cheaper.
CREATE TABLE IF NOT EXISTS `{table}` (
  id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  destination VARCHAR(255) NOT NULL,
  ready       BIGINT NOT NULL,
  message     MEDIUMBLOB NOT NULL,
  created     BIGINT NOT NULL,
  lease_until BIGINT NOT NULL DEFAULT 0,
  lease_token BIGINT NOT NULL DEFAULT 0,
  deliveries  INT NOT NULL DEFAULT 0,
  PRIMARY KEY (id),
  KEY ready (ready),
  KEY destination_ready (destination, ready, created)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- section: dead
CREATE TABLE IF NOT EXISTS `{table}` (
  id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  lane        VARCHAR(16) NOT NULL,
  destination VARCHAR(255) NOT NULL,
  message     MEDIUMBLOB NOT NULL,
  reason      VARCHAR(255) NOT NULL,
  deliveries  INT NOT NULL DEFAULT 0,
  died_at     BIGINT NOT NULL,
  PRIMARY KEY (id),
  KEY destination (destination)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
