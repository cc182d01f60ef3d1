"""One cluster's nodes in one URL (``?cluster=failover``): failover, not shards."""

from __future__ import annotations

import pytest

from mvalve_async.errors import ConfigError
from mvalve_async.queues.innodb import InnoDBQueue
from mvalve_async.registry import make_queue
from mvalve_async.urls import QueueSettings, Tables, parse_queue_url

PASSWORD = "Hunter2-s3cret"
NODES = (("127.0.0.1", 3311), ("127.0.0.1", 3312), ("127.0.0.1", 3313))


@pytest.mark.parametrize(
    ("url", "nodes"),
    [
        ("mysql+innodb://app@127.0.0.1:3311,127.0.0.1:3312,127.0.0.1:3313/test?cluster=failover",
         NODES),
        ("mysql://g1,g2:3307/db?cluster=failover", (("g1", 3306), ("g2", 3307))),
        ("mariadb://u@[::1]:3306,[fe80::2]/db?pool_size=4&cluster=failover",
         (("::1", 3306), ("fe80::2", 3306))),
        ("mysql+innodb://u@only:3310/db?cluster=failover", (("only", 3310),)),
    ],
)  # fmt: skip
def test_cluster_failover_names_nodes_not_shards(
    url: str, nodes: tuple[tuple[str, int], ...]
) -> None:
    s = parse_queue_url(url)
    assert s.dialect == "innodb"
    assert s.nodes == nodes and s.shards == ()
    assert (s.host, s.port) == nodes[0]
    assert s.shard_settings() == [s]  # one queue, whatever the number of nodes


def test_the_same_hosts_without_the_option_are_shards() -> None:
    s = parse_queue_url("mysql+innodb://app@127.0.0.1:3311,127.0.0.1:3312,127.0.0.1:3313/test")
    assert s.shards == NODES and s.nodes == ()


def test_a_cluster_url_makes_one_innodb_queue_with_every_option() -> None:
    s = parse_queue_url(
        f"mysql+innodb://app:{PASSWORD}@h1:3311,h2:3312/prod?cluster=failover&normal=n"
        "&dead=dl&pool_size=3"
    )
    assert (s.user, s.password, s.database, s.pool_size) == ("app", PASSWORD, "prod", 3)
    assert s.tables == Tables(normal=("n",), dead="dl")
    queue = make_queue(s)
    assert isinstance(queue, InnoDBQueue)
    assert queue.db.nodes == (("h1", 3311), ("h2", 3312)) and queue.db.failover


def test_safe_url_keeps_the_nodes_and_the_option_and_masks_the_password() -> None:
    s = parse_queue_url(f"mysql+innodb://app:{PASSWORD}@h1:3311,[::1]:3312/prod?cluster=failover")
    assert s.safe_url() == "mysql+innodb://app:***@h1:3311,[::1]:3312/prod?cluster=failover"
    for text in (repr(s), str(s), s.safe_url(), repr(make_queue(s))):
        assert PASSWORD not in text
    again = parse_queue_url(s.safe_url().replace(":***", ""))
    assert again.nodes == s.nodes and again.shards == ()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("mysql+innodb://h1,h2/db?cluster=spread", "cluster=failover"),
        ("mysql+q4m://h1,h2/db?cluster=failover", r"mysql\+innodb://"),
        ("mysql+q4m://h1/db?cluster=failover", r"mysql\+innodb://"),
        ("sqlite:///x.db?cluster=failover", "unknown URL option"),
        ("mysql+innodb://h1:3311,h1:3311/db?cluster=failover", "twice"),
        ("mysql+innodb://h1,,h2/db?cluster=failover", "empty entry"),
    ],
)
def test_bad_cluster_urls_raise_config_error(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_queue_url(url)


def test_the_password_is_never_in_a_cluster_config_error() -> None:
    for url in (
        f"mysql+innodb://app:{PASSWORD}@h1,h2/db?cluster=nope",
        f"mysql+innodb://app:{PASSWORD}@h1,h2:x/db?cluster=failover",
        f"mysql+q4m://app:{PASSWORD}@h1,h2/db?cluster=failover",
    ):
        with pytest.raises(ConfigError) as info:
            parse_queue_url(url)
        assert PASSWORD not in str(info.value)


def test_settings_made_by_hand_may_name_nodes() -> None:
    s = QueueSettings("innodb", host="a", port=1, nodes=(("a", 1), ("b", 2)))
    assert s.safe_url() == "mysql+innodb://root@a:1,b:2/test?cluster=failover"
