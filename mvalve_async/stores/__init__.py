"""State stores: `memory` (one process) and `memcached` (shared by every reader)."""
