"""Operations: what a deployment watches, beside delivery.

- `StatsLog` (statslog.py): an observer that counts events per destination,
  action and minute into a table of the queue's database (its MySQL and SQLite
  backends in statslog_backends.py); `mvalve statslog` shows it.
- `PrometheusObserver` and `LaneDepthCollector` (metrics.py): Prometheus metrics,
  with the optional `prometheus` extra (imported only when one is built).

Nothing in the engine imports this package: it observes through `events.Observer`
and reads through the `Queue` and `Store` contracts.
"""

from .metrics import LaneDepthCollector, PrometheusObserver, start_http_server
from .statslog import StatsLog

__all__ = ["LaneDepthCollector", "PrometheusObserver", "StatsLog", "start_http_server"]
