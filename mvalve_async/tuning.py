"""The engine's tuning constants, in one place: what each trades, and what measured it.

Each value trades speed, latency, load or memory against another; the modules that
use it import it from here. Two are also safety margins and say so (UPTIME_SLACK,
HOLD_AFTER_LEASE): they may grow, not shrink; GRACE is a bound the README states.
None is a format shared across processes and versions: those
are marked "compatibility surface" where they are defined (throttle/schedule.py,
message.py, schema/*.sql, queues/sharded.py, queues/_q4m_rows.py,
stores/memcached.py).

Measurements cited are of this repository's benchmarks and tests on the
development machines (2 shared cores, MariaDB 10.11, memcached 1.6); commits
quoted by their subject.
"""

from __future__ import annotations

__all__ = [
    "BACKSTOP",
    "CALL_TIMEOUT",
    "CUT_RETRY",
    "FULL_EVERY",
    "FULL_RETRY",
    "GRACE",
    "GROUP_SPAN",
    "HELD_RETRY",
    "HOLD_AFTER_LEASE",
    "IDLE_KEEP",
    "INNODB_SCAN_CHUNK",
    "INNODB_SCAN_SLACK",
    "LEAD",
    "MAX_DESTINATIONS",
    "MAX_LEAD",
    "PACED_SLOTS",
    "RECORD_MARGIN",
    "RETRY_WINDOW",
    "ROUNDS",
    "SCAN_BUSY",
    "SCAN_COST_FACTOR",
    "SHARD_BACKOFF",
    "SQLITE_SCAN_SLACK",
    "UPTIME_SLACK",
    "WAVES",
]

# -- the valve (throttle/) -------------------------------------------------------

# How far ahead of now a slot is granted (the holder keeps the row aside until then):
# a moment, so that a row is at hand when its slot comes, not so long that rows
# and holds sit idle (a burst's next window is a whole period away). A paced rate
# gets up to PACED_SLOTS of its slots at once (at most MAX_LEAD ahead). Measured
# ("Readers idle when nothing is claimable, hold slots a moment ahead, not a
# second"): granting 1 s ahead, readers parked whole batches a window early and the
# quick `scale` drain took 4.2 times the ideal; at 50 ms, 1.28.
LEAD = 0.05
PACED_SLOTS = 4
MAX_LEAD = 1.0

# One store call (with its optimistic retries) may take this long at most: longer
# waits for a store that does not answer, shorter gives up on a slow one sooner
# (a check-in or grant given up is undone by the next decision, or its hold ends).
CALL_TIMEOUT = 2.0

# A store that ignored its `deadline=` is cut off this much after it (a backstop to
# the stores' own deadlines, which cut calls off with their connections in step).
BACKSTOP = 0.05

# memcached reports `uptime` from 2 s before it started, counted on a clock that
# ticks once a second (`uptime = current_time - ITEM_UPDATE_INTERVAL`; measured on
# 1.6.18: 2 right after the start), so a server that reports `u` started at least
# `u - 3` seconds ago, on any version that counts so; one more second to spare.
# A safety margin: larger holds destinations longer after a restart; below 3 a
# record lost in a restart could go unnoticed (and a slot be granted twice).
UPTIME_SLACK = 4.0

# Another reader holds the destination (it is leasing and handing out its messages):
# ask again this much later. Holders check in as soon as their last one is out.
# Shorter costs store round trips while waiting; longer, latency after a check-in.
HELD_RETRY = 0.02

# Every place in flight (a concurrency limit) is taken: ask again this much later
# (or when one lapses). The reader that frees a place may take it again at once
# itself; the others ask at this pace. Shorter costs store round trips; longer,
# latency. Measured (4 processes x 4 workers, k = 2, 100 ms handlers): 16-18 store
# round trips per message, 9 refused asks per granted one; doubling the wait at each
# refusal (up to 1 s) cut that to 12-13 and the rate from 14-18.5/s to 15-16/s.
FULL_RETRY = 0.1

# A store record outlives what it remembers (its window, a duration, a pause, a
# hold) by this much, seconds: the reader option `record_margin`'s default. Longer
# keeps idle destinations' records (memory), shorter lets a record expire sooner
# after its window (a destination idle past it starts afresh, which the rate
# allows). Measured (tests/integration/test_rate_state_promise.py): a window of 4 s
# with record_margin=0, idle 3 s: the next message went 4.01 s after the first.
RECORD_MARGIN = 60.0

# -- the reader (reader/) --------------------------------------------------------

# At most this many destinations per claim (their share of the batch each): more
# spreads a claim thinner and makes its statement longer; fewer serves fewer
# destinations per round trip.
MAX_DESTINATIONS = 16
# A round asks the valve in at most this many waves before its claim: when the
# destinations picked first may send fewer than the batch (their rate), the next
# ones in line fill it (one store round trip per wave, one claim per round).
# Measured ("Claims at scale: ..."): 1,000 destinations at Rate(20, 1), 4
# processes: 7.5 rows per claim with one wave, 11 with three.
WAVES = 3

# A destination with a rate is held while its group is handed out: a reader takes
# no more of its rows than its consumer gets through in about this long (a paced
# rate: GROUP_SPAN / its spacing). Longer keeps other readers off the destination
# longer; shorter costs more claims per message.
GROUP_SPAN = 0.05

# A reader holding a destination's rows keeps the hold this long after its leases
# end, so that a dead holder's rows have come back (and go first) when it ends.
# A dead reader's destination waits its lease plus this (README: "the lease plus
# 1 s"). A safety margin of the order guarantee: shorter, and another reader could
# take the destination's newer rows before the dead holder's have come back.
HOLD_AFTER_LEASE = 1.0

# While busy, the reader's process scans the queue for new rows at most this often
# (idle: the reader's `idle_interval`, 60 ms). Shorter finds rows written by other
# processes sooner, at one statement per scan (README, "How readers find
# destinations").
SCAN_BUSY = 0.01

# `next(timeout)` returns by its deadline plus this: the store and queue calls it
# makes are bounded by it (a store or node that does not answer cannot hold it).
# The README states this bound. Measured (issue 19): memcached black-holed for 4 s
# at Rate(5, 1), the slowest next(timeout=1) returned after 1.30 s.
GRACE = 0.3

# Claim rounds one `next` tries while the destinations it picks come back empty
# (their rows were taken by other readers meanwhile) before it waits. Measured
# with the `fairness` bench: a reader that retried at once over a held backlog
# spent 4.97 s of CPU in 5 s; waiting instead, 0.13 s for the same deliveries.
ROUNDS = 8

# A destination whose claim was cut for want of the queue's capacity (q4m: every
# owner connection holds a row) is tried again this much later, while it stays in
# line: sooner costs a claim round (and a valve checkout) per try while the owners
# are still busy; later leaves a freed owner idle. Before, the destination left the
# line until the next scan, and four readers sharing 10 owners under CPU load
# each waited out next(timeout=0.5) with 367 of 1,000 rows queued.
CUT_RETRY = 0.02

# A full scan of the queue (which finds rows that came back by lease expiry, or
# whose insert committed behind a later one) every this many seconds, or 20 times
# as long as the last one took. The innodb loose index scan took 8 ms for 1,000
# destinations over a million rows (README, "How readers find destinations").
FULL_EVERY = 5.0

# Scans are spaced at least this many times their own cost: a dialect whose scans
# read every row (q4m) scans less often as its backlog grows, so scanning costs at
# most about a tenth of a reader's time.
SCAN_COST_FACTOR = 10.0

# -- the dialects (queues/) ------------------------------------------------------

# innodb's incremental scan reads the rows above its last id mark, less this many
# ids: inserts that committed out of order (a lower id after a higher one). A row
# that commits later than that is found by the next full scan (FULL_EVERY).
INNODB_SCAN_SLACK = 256
# ... and at most this many ids above the mark per scan: a burst of inserts is read
# by the next scans, a chunk each, rather than in one long statement.
INNODB_SCAN_CHUNK = 100_000

# sqlite's incremental scan: ids re-read below the mark (writers of one host, so
# fewer commit out of order).
SQLITE_SCAN_SLACK = 64

# The MySQL pool: a call without a deadline resends rolled-back work (deadlocks,
# lock wait timeouts, Galera certification failures) for this long, seconds.
RETRY_WINDOW = 10.0

# The MySQL pool keeps a connection out of aiomysql's pool this long unused
# between uses (seconds): aiomysql's acquire and release cost more client CPU than
# a one-row INSERT's round trip (`insert` 146 -> 112 us of CPU, README
# "Performance").
IDLE_KEEP = 30.0

# Seconds between probes of a down shard (the last one repeats): sooner notices a
# shard back sooner, at a connection attempt per probe (README: "probe it every 1 to
# 5 s").
SHARD_BACKOFF = (1.0, 1.0, 2.0, 2.0, 3.0, 4.0, 5.0)
