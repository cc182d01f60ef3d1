-- mvalve-async schema for MySQL >= 8.0 / MariaDB >= 10.6 (InnoDB, SKIP LOCKED leases).
-- Times are integer microseconds since the epoch. `mvalve create --print` shows
-- this file rendered with your table names.

-- section: lane
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
-- KEY ready is the claim's order, (ready, created, id): due rows come without a sort.
CREATE TABLE IF NOT EXISTS `{table}` (
  id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  destination VARCHAR(255) NOT NULL,
  ready       BIGINT NOT NULL,
  reserved    TINYINT NOT NULL DEFAULT 0,
  message     MEDIUMBLOB NOT NULL,
  created     BIGINT NOT NULL,
  lease_until BIGINT NOT NULL DEFAULT 0,
  lease_token BIGINT NOT NULL DEFAULT 0,
  deliveries  INT NOT NULL DEFAULT 0,
  PRIMARY KEY (id),
  KEY ready (ready, created),
  KEY destination (destination)
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
