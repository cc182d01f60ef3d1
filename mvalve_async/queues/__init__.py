"""Queue dialects: innodb, q4m, sqlite, memory. Each implements `interfaces.Queue`."""
