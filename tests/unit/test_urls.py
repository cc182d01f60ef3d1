"""Backend URLs: every scheme parses, bad ones raise ConfigError, passwords never show."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mvalve_async import registry
from mvalve_async.errors import ConfigError
from mvalve_async.queues.memory import MemoryQueue
from mvalve_async.registry import make_queue, make_store
from mvalve_async.urls import (
    DEFAULT_SQLITE_PATH,
    QueueSettings,
    StoreSettings,
    Tables,
    parse_queue_url,
    parse_store_url,
    validate_identifier,
)

PASSWORD = "Hunter2-s3cret"
QUEUE_SCHEMES = ["mysql", "mysql+innodb", "mysql+q4m", "mariadb", "sqlite", "memory"]
BAD_NAMES = ["q; DROP TABLE x", "q`; DROP TABLE x; --", "`q`", "q x", " q", "q\n", "a" * 65, "",
             "1q", "q-x", "q.x", "db.q", "q'", 'q"', "q%s", "tablé", "q\x00", "q/*c*/"]  # fmt: skip


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://u:pw@db.example:3307/app",
         {"dialect": "innodb", "host": "db.example", "port": 3307, "user": "u", "database": "app"}),
        ("mysql+innodb://root@127.0.0.1/test",
         {"dialect": "innodb", "host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}),
        ("MySQL+InnoDB://h/db", {"dialect": "innodb", "host": "h", "database": "db"}),
        ("mariadb://h", {"dialect": "innodb", "host": "h", "user": "root", "database": "test"}),
        ("mysql+q4m://u:p%40ss@h/q", {"dialect": "q4m", "user": "u", "password": "p@ss"}),
        ("mysql+innodb://", {"dialect": "innodb", "host": "127.0.0.1", "port": 3306}),
        ("sqlite:///relative/q.db", {"dialect": "sqlite", "path": "relative/q.db"}),
        ("sqlite:////abs/dir/q.db", {"dialect": "sqlite", "path": "/abs/dir/q.db"}),
        ("sqlite:///with%20space.db", {"dialect": "sqlite", "path": "with space.db"}),
        ("sqlite://", {"dialect": "sqlite", "path": DEFAULT_SQLITE_PATH}),
        ("memory://", {"dialect": "memory"}),
    ],
)  # fmt: skip
def test_every_queue_scheme_parses(url: str, expected: dict[str, Any]) -> None:
    settings = parse_queue_url(url)
    assert {key: getattr(settings, key) for key in expected} == expected
    assert settings.tables == Tables()
    assert QueueSettings.from_url(url) == settings


def test_query_options_set_tables_and_sizes() -> None:
    s = parse_queue_url(
        "mysql+innodb://h/db?emergency=e1,e2&timed=t&normal=n1, n2&dead=dl&pool_size=3"
        "&max_destination=64"
    )
    assert s.tables == Tables(emergency=("e1", "e2"), timed=("t",), normal=("n1", "n2"), dead="dl")
    assert (s.pool_size, s.max_destination) == (3, 64)
    assert [name for _, name in s.tables.all()] == ["e1", "e2", "t", "n1", "n2"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("memcached://h1:1,h2:2?namespace=x",
         StoreSettings("memcached", (("h1", 1), ("h2", 2)), "x", 8)),
        ("memcached://cache", StoreSettings("memcached", (("cache", 11211),))),
        ("memcached://", StoreSettings("memcached", (("127.0.0.1", 11211),))),
        ("memcached://:5000/?pool_size=2",
         StoreSettings("memcached", (("127.0.0.1", 5000),), "mvalve", 2)),
        ("memory://", StoreSettings("memory")),
    ],
)  # fmt: skip
def test_every_store_scheme_parses(url: str, expected: StoreSettings) -> None:
    assert parse_store_url(url) == expected
    assert StoreSettings.from_url(url) == expected


@pytest.mark.parametrize("scheme", ["redis", "postgres", "mysql+myisam", "sqlite3", "file", "q4m"])
def test_unknown_queue_scheme_is_named(scheme: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"unknown queue URL scheme '{scheme}'")):
        parse_queue_url(f"{scheme}://u:{PASSWORD}@h/db")


def test_the_unknown_scheme_error_lists_every_accepted_scheme() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_queue_url("postgres://h/db")
    assert str(caught.value).endswith(
        ": use mysql+innodb://, mysql://, mariadb://, mysql+q4m://, sqlite:/// or memory://"
    )
    for scheme in ("mysql+innodb", "mysql", "mariadb", "mysql+q4m", "sqlite", "memory"):
        parse_queue_url(f"{scheme}:///x")  # each one listed parses


@pytest.mark.parametrize("scheme", ["redis", "memcache", "mysql"])
def test_unknown_store_scheme_is_named(scheme: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown store URL scheme '{scheme}'"):
        parse_store_url(f"{scheme}://h:1")


@pytest.mark.parametrize("url", ["", "mysql", "127.0.0.1:3306", "mysql:/h/db", None, 42])
def test_a_url_without_scheme_raises_config_error(url: Any) -> None:
    for parse in (parse_queue_url, parse_store_url):
        with pytest.raises(ConfigError, match="scheme://"):
            parse(url)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_table_names_raise_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="not a plain identifier"):
        validate_identifier(name)
    with pytest.raises(ConfigError):
        Tables(normal=(name,))
    with pytest.raises(ConfigError):
        Tables(dead=name)


@pytest.mark.parametrize("option", ["emergency", "timed", "normal", "dead"])
@pytest.mark.parametrize(
    "value", ["q;%20DROP%20TABLE%20x", "q%60x", "q%20x", "a" * 65, "1q", "q-x", "db.q"]
)
def test_bad_table_names_in_a_url_raise_config_error(option: str, value: str) -> None:
    with pytest.raises(ConfigError, match="not a plain identifier"):
        parse_queue_url(f"mysql+innodb://h/db?{option}={value}")


def test_identifiers_up_to_64_characters_are_plain() -> None:
    for name in ("q", "_q", "Q_1", "a" * 64, "q_incoming"):
        assert validate_identifier(name) == name
    with pytest.raises(ConfigError):
        validate_identifier(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"normal": ("a", "a")}, {"emergency": ("x",), "timed": ("x",)},
     {"normal": ("q_dead",)}, {"dead": "q_emerg"}, {"timed": ("t", "q_incoming")}],
)  # fmt: skip
def test_a_table_named_twice_raises_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="named twice"):
        Tables(**kwargs)


@pytest.mark.parametrize(
    "query", ["normal=a,a", "emergency=x&timed=x", "dead=q_incoming", "normal=q_emerg"]
)
def test_a_table_named_twice_in_a_url_raises_config_error(query: str) -> None:
    with pytest.raises(ConfigError, match="named twice"):
        parse_queue_url(f"mysql+innodb://h/db?{query}")


@pytest.mark.parametrize("lane", ["emergency", "timed", "normal"])
def test_a_lane_without_tables_raises_config_error(lane: str) -> None:
    with pytest.raises(ConfigError, match="at least one table"):
        Tables(**{lane: ()})
    with pytest.raises(ConfigError, match="at least one table"):
        parse_queue_url(f"mysql+innodb://h/db?{lane}=,")


@pytest.mark.parametrize(
    ("url", "words"),
    [("mysql+innodb://h/db?tables=a", "tables"), ("mysql://h/db?bogus=1&zzz=2", "bogus, zzz"),
     ("sqlite:///q.db?namespace=x", "namespace"), ("memory://?user=x", "user"),
     ("memcached://h:1?normal=q", "normal"), ("memcached://h:1?timeout=3", "timeout"),
     ("mysql+innodb://h/db?pool_size=x", "pool_size must be an integer"),
     ("mysql+innodb://h/db?pool_size=0", "pool_size must be positive"),
     ("mysql+innodb://h/db?max_destination=-4", "max_destination must be positive"),
     ("memcached://h:1?pool_size=many", "pool_size"), ("mysql+innodb://h/db?a=1&&b", "malformed")],
)  # fmt: skip
def test_unknown_or_bad_query_options_raise_config_error(url: str, words: str) -> None:
    parse = parse_store_url if url.startswith("memcached") else parse_queue_url
    with pytest.raises(ConfigError, match=words):
        parse(url)


# passwords ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["mysql", "mysql+innodb", "mysql+q4m", "mariadb"])
def test_the_password_is_never_in_a_repr_or_safe_url(scheme: str) -> None:
    settings = parse_queue_url(f"{scheme}://app:{PASSWORD}@db:3306/prod?pool_size=2")
    assert settings.password == PASSWORD
    for text in (repr(settings), str(settings), settings.safe_url(), repr([settings])):
        assert PASSWORD not in text
    assert settings.safe_url().startswith(f"mysql+{settings.dialect}://app:***@db:3306/prod")
    assert PASSWORD not in repr(QueueSettings("innodb", password=PASSWORD))


def test_safe_url_writes_an_ipv6_host_in_brackets_so_it_parses_back() -> None:
    settings = parse_queue_url(f"mysql+innodb://app:{PASSWORD}@[::1]:3307/prod")
    assert settings.safe_url() == "mysql+innodb://app:***@[::1]:3307/prod"
    again = parse_queue_url(settings.safe_url())
    assert (again.host, again.port, again.database) == ("::1", 3307, "prod")


@pytest.mark.parametrize(
    "url",
    [f"mysql+innodb://u:{PASSWORD}@h:port/db", f"mysql+innodb://u:{PASSWORD}@h:99999/db",
     f"mysql+innodb://u:{PASSWORD}@h/db?bogus=1", f"mysql+innodb://u:{PASSWORD}@h/db?normal=a;b",
     f"mysql+innodb://u:{PASSWORD}@h/db?pool_size=x", f"mysql+innodb://u:{PASSWORD}@h/db?a=1&&",
     f"mysql+q4m://u:{PASSWORD}@h/db?normal=x,x", f"postgres://u:{PASSWORD}@h/db",
     f"mysql+innodb:/u:{PASSWORD}@h/db", f"u:{PASSWORD}@h/db", f"mysql+innodb://u:{PASSWORD}"],
)  # fmt: skip
def test_the_password_is_never_in_a_config_error(url: str) -> None:
    try:
        parse_queue_url(url)
    except ConfigError as exc:
        assert PASSWORD not in str(exc)
        assert PASSWORD not in repr(exc)
    else:  # parsed: then the settings do not show it either
        assert PASSWORD not in repr(parse_queue_url(url))


@pytest.mark.parametrize(
    "url", [f"memcached://u:{PASSWORD}@h:x", f"memcached://u:{PASSWORD}@h:11211"]
)
def test_the_password_is_never_in_a_memcached_error_or_repr(url: str) -> None:
    try:
        settings = parse_store_url(url)
    except ConfigError as exc:
        assert PASSWORD not in str(exc)
    else:
        assert PASSWORD not in repr(settings)


@pytest.mark.parametrize("url", [f"mysql://u:{PASSWORD}@[::1/db", "mysql+q4m://[zz]/db"])
def test_a_malformed_ipv6_host_raises_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_queue_url(url)


def test_the_password_is_never_in_the_database_name() -> None:
    url = f"mysql+innodb:///root:{PASSWORD}@127.0.0.1/test"
    try:
        settings = parse_queue_url(url)
    except ConfigError as exc:
        assert PASSWORD not in str(exc)
    else:
        assert PASSWORD not in repr(settings)


# `[` `]` hit the IPv6 bug above (which leaks nothing); a user name holds no delimiter.
user_text = st.text(st.characters(exclude_characters="[]/?#@", codec="utf-8"), max_size=20)
url_text = st.text(st.characters(exclude_characters="[]", codec="utf-8"), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["mysql", "mysql+innodb", "mysql+q4m", "mariadb"]), user_text, url_text)
def test_the_password_never_leaks_from_any_queue_url(scheme: str, before: str, after: str) -> None:
    assume(PASSWORD not in before + after)
    url = f"{scheme}://{before}:{PASSWORD}@{after}"
    try:
        settings = parse_queue_url(url)
    except ConfigError as exc:
        assert PASSWORD not in str(exc)
    else:
        assert PASSWORD not in repr(settings)
        assert PASSWORD not in settings.safe_url()


# Non-strict: hypothesis reaches the IPv6 bug above often, not always. One bug reported at a
# time: urlsplit and .hostname raise that ValueError from two places.
@settings(max_examples=500, deadline=None, report_multiple_bugs=False)
@given(st.text() | st.builds("{}://{}".format, st.sampled_from([*QUEUE_SCHEMES, "memcached"]),
                             st.text()))  # fmt: skip
def test_arbitrary_text_parses_or_raises_config_error(text: str) -> None:
    for parse in (parse_queue_url, parse_store_url):
        try:
            parse(text)
        except ConfigError:
            pass


# make_queue / make_store -----------------------------------------------------------------


def test_make_queue_honours_mvalve_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVALVE_URL", "memory://?normal=n1")
    queue = make_queue()
    assert isinstance(queue, MemoryQueue)
    assert queue.settings.tables.normal == ("n1",)


def test_make_queue_defaults_to_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[QueueSettings] = []
    monkeypatch.setitem(registry.QUEUES, "sqlite", made.append)
    for env in (None, ""):
        if env is None:
            monkeypatch.delenv("MVALVE_URL", raising=False)
        else:
            monkeypatch.setenv("MVALVE_URL", env)
        make_queue()
    assert [(s.dialect, s.path) for s in made] == [("sqlite", DEFAULT_SQLITE_PATH)] * 2


def test_make_queue_takes_a_url_or_settings_before_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[QueueSettings] = []
    monkeypatch.setitem(registry.QUEUES, "innodb", made.append)
    monkeypatch.setenv("MVALVE_URL", "memory://")
    make_queue(f"mysql+innodb://u:{PASSWORD}@h/db")
    settings = QueueSettings("innodb", host="other")
    make_queue(settings)
    assert made[0].password == PASSWORD and made[1] is settings
    monkeypatch.setenv("MVALVE_URL", "redis://h")
    with pytest.raises(ConfigError, match="'redis'"):
        make_queue()


def test_make_store_honours_mvalve_store_url(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[StoreSettings] = []
    monkeypatch.setitem(registry.STORES, "memcached", made.append)
    monkeypatch.setitem(registry.STORES, "memory", made.append)
    monkeypatch.setenv("MVALVE_STORE_URL", "memcached://a:1,b:2?namespace=ns")
    make_store()
    monkeypatch.delenv("MVALVE_STORE_URL")
    make_store()
    assert made == [StoreSettings("memcached", (("a", 1), ("b", 2)), "ns"), StoreSettings("memory")]
