"""Hot rows through one node against spread over three (tests/galera/hot.py; the
README's figures come from its command line, with more messages and runs)."""

from __future__ import annotations

from tests.galera.hot import measure
from tests.galera_proc import GaleraCluster
from tests.ledger import LINES


async def test_one_node_has_no_certification_conflicts_spread_has_many(
    galera: GaleraCluster,
) -> None:
    one = await measure(galera, spread=False, messages=600)
    spread = await measure(galera, spread=True, messages=600)
    for fig in (one, spread):
        LINES.append("galera hot rows " + fig.line())
        print("\n" + fig.line())
        assert not fig.errors and fig.claimed_twice == 0 and fig.claimed == 600
    # Through one node every write is local: nothing to certify against, nothing to
    # abort. Spread, claims on different nodes take the same head rows.
    assert one.cert_failures == 0 and one.bf_aborts == 0
    assert spread.cert_failures + spread.bf_aborts > 0 and spread.retries > 0
