"""The Q4M emulator: an in-memory Q4M speaking the MySQL wire protocol, so that the
q4m dialect is tested without a server built with the plugin (README, "Testing
without Q4M"). `emulator.py` is the server (`Q4MServer`), `fixtures.py` the
`q4m_server` fixture, `sql.py` the SQL subset it parses, `cond.py` the
`queue_wait` condition language, `store.py` the in-memory QUEUE tables."""
