"""Sharded queue URLs: several hosts in one mysql+innodb:// netloc."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvalve_async import registry
from mvalve_async.errors import ConfigError
from mvalve_async.queues.sharded import ShardedQueue
from mvalve_async.registry import make_queue
from mvalve_async.urls import QueueSettings, Tables, parse_queue_url

PASSWORD = "Hunter2-s3cret"


@pytest.mark.parametrize(
    ("url", "shards"),
    [
        ("mysql+innodb://root@h1:3306,h2:3307/test", (("h1", 3306), ("h2", 3307))),
        ("mysql://h1,h2,h3/db", (("h1", 3306), ("h2", 3306), ("h3", 3306))),
        ("mariadb://u@db-a.example:3306,db-b.example/app",
         (("db-a.example", 3306), ("db-b.example", 3306))),
        ("mysql+innodb://u@[::1]:3306,[fe80::2]/db", (("::1", 3306), ("fe80::2", 3306))),
        ("mysql+innodb://u@10.0.0.1, 10.0.0.2:3310/db", (("10.0.0.1", 3306), ("10.0.0.2", 3310))),
        ("mysql+innodb://H1:1,H2:2/db", (("h1", 1), ("h2", 2))),  # like hostname: lower case
    ],
)  # fmt: skip
def test_several_hosts_parse_into_shards(url: str, shards: tuple[tuple[str, int], ...]) -> None:
    s = parse_queue_url(url)
    assert s.dialect == "innodb" and s.shards == shards
    assert (s.host, s.port) == shards[0]  # the first host also fills the single-host fields


def test_every_shard_shares_user_password_database_and_options() -> None:
    s = parse_queue_url(
        f"mysql+innodb://app:{PASSWORD}@h1:3306,h2:3307/prod?normal=n&dead=dl&pool_size=3"
        "&max_destination=60"
    )
    children = s.shard_settings()
    assert [(c.host, c.port) for c in children] == [("h1", 3306), ("h2", 3307)]
    for c in children:
        assert (c.user, c.password, c.database) == ("app", PASSWORD, "prod")
        assert c.tables == Tables(normal=("n",), dead="dl")
        assert (c.pool_size, c.max_destination, c.shards) == (3, 60, ())


def test_one_host_is_not_sharded() -> None:
    s = parse_queue_url("mysql+innodb://root@h1:3306/test")
    assert s.shards == () and s.shard_settings() == [s]


def test_safe_url_lists_every_host_and_never_the_password() -> None:
    s = parse_queue_url(f"mysql+innodb://app:{PASSWORD}@h1,[::1]:3307/prod")
    assert s.safe_url() == "mysql+innodb://app:***@h1:3306,[::1]:3307/prod"
    for text in (repr(s), str(s), s.safe_url(), repr(s.shard_settings())):
        assert PASSWORD not in text
    queue = make_queue(s)
    assert PASSWORD not in repr(queue)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("mysql+innodb://h1,,h2/db", "empty entry"),
        ("mysql+innodb://h1,/db", "empty entry"),
        ("mysql+innodb://,h2/db", "empty entry"),
        ("mysql+innodb://h1:x,h2/db", "'h1:x' is malformed"),
        ("mysql+innodb://h1,h2:99999/db", "'h2:99999' is malformed"),
        ("mysql+innodb://h1,[::1/db", "malformed"),
        ("mysql+innodb://h1:3306,h1/db", "names h1:3306 twice"),
        ("mysql+q4m://h1,h2/db", "mysql\\+innodb:// only"),
        ("mysql+innodb://h1,h2/db?bogus=1", "bogus"),
    ],
)
def test_bad_host_lists_raise_config_error(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_queue_url(url)


def test_a_bad_host_list_never_shows_the_password() -> None:
    for tail in ("h1,,h2/db", "h1:x,h2/db", "h1,h1/db", "h1,[::1/db"):
        with pytest.raises(ConfigError) as info:
            parse_queue_url(f"mysql+innodb://u:{PASSWORD}@{tail}")
        assert PASSWORD not in str(info.value) and PASSWORD not in repr(info.value)


def test_make_queue_builds_a_sharded_queue_of_one_child_per_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[QueueSettings] = []

    def fake(s: QueueSettings) -> object:
        made.append(s)
        from mvalve_async.queues.memory import MemoryQueue

        return MemoryQueue(s)

    monkeypatch.setitem(registry.QUEUES, "innodb", fake)
    queue = make_queue("mysql+innodb://root@h1:3306,h2:3307/test?max_destination=50")
    assert isinstance(queue, ShardedQueue)
    assert [(s.host, s.port, s.shards) for s in made] == [("h1", 3306, ()), ("h2", 3307, ())]
    assert queue.settings.max_destination == 50  # what Pipe hands to writers and readers
    assert queue.settings.shards == (("h1", 3306), ("h2", 3307))


def test_ring_keys_are_host_port_so_the_order_of_hosts_does_not_matter() -> None:
    a = make_queue("mysql+innodb://root@h1:3306,h2:3307,h3/test")
    b = make_queue("mysql+innodb://root@h3,h1:3306,h2:3307/test")
    assert isinstance(a, ShardedQueue) and isinstance(b, ShardedQueue)
    label_a = [s.label for s in a.shards]
    label_b = [s.label for s in b.shards]
    for dest in (f"dest-{i}" for i in range(200)):
        assert label_a[a.shard_of(dest)] == label_b[b.shard_of(dest)]


host = st.from_regex(re.compile(r"[a-z][a-z0-9-]{0,10}"), fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(host, st.integers(1, 65535)), min_size=2, max_size=6, unique=True))
def test_any_list_of_hosts_round_trips_through_safe_url(hosts: list[tuple[str, int]]) -> None:
    netloc = ",".join(f"{h}:{p}" for h, p in hosts)
    s = parse_queue_url(f"mysql+innodb://u:{PASSWORD}@{netloc}/db")
    assert s.shards == tuple(hosts)
    again = parse_queue_url(s.safe_url().replace(":***", ":x"))
    assert again.shards == s.shards and PASSWORD not in s.safe_url()
