"""URLs name backends: the settings dataclasses and their parsing.

The backend registry (which class a dialect or store kind is) is in registry.py,
which imports the dialects; the dialects import this module: one way.

Queues:  mysql+innodb://user:pass@host:3306/db?tables=...   (also mysql://)
         mysql+innodb://user:pass@h1:3306,h2:3306/db   shards on several servers
         mysql+q4m://user:pass@host/db
         sqlite:///relative/path.db  sqlite:////absolute/path.db
         memory://
Stores:  memcached://h1:11211,h2:11211?namespace=mvalve
         memory://

Query options: emergency=, timed=, normal= (comma-separated table names),
dead=, pool_size=, namespace=. Passwords never appear in a repr or an error.

Shards: several comma-separated ``host[:port]`` in one innodb URL (IPv6 in
brackets) make a `ShardedQueue`, one child queue per server; every shard shares
the user, password, database and query options (the same table names on each).

One cluster: the same host list with ``?cluster=failover`` names the nodes of one
cluster holding the same tables (MariaDB Galera), not shards:
``mysql+innodb://app@h1:3306,h2:3306,h3:3306/db?cluster=failover``. The pool uses
one node at a time and moves to the next when it fails (`QueueSettings.nodes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import ConfigError
from .interfaces import Lane

__all__ = [
    "DEFAULT_SQLITE_PATH",
    "QueueSettings",
    "StoreSettings",
    "Tables",
    "hostport",
    "parse_queue_url",
    "parse_store_url",
    "validate_identifier",
]

DEFAULT_SQLITE_PATH = "mvalve.sqlite3"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


def validate_identifier(name: str) -> str:
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ConfigError(
            f"table name {name!r} is not a plain identifier (letters, digits, _; max 64)"
        )
    return name


@dataclass(frozen=True, slots=True)
class Tables:
    """Table names per lane (each lane one or more tables) and the dead letters."""

    emergency: tuple[str, ...] = ("q_emerg",)
    timed: tuple[str, ...] = ("q_timed",)
    normal: tuple[str, ...] = ("q_incoming",)
    dead: str = "q_dead"

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for lane in Lane:
            names = self.lane(lane)
            if not names:
                raise ConfigError(f"lane {lane} needs at least one table")
            for name in names:
                validate_identifier(name)
                if name in seen:
                    raise ConfigError(f"table {name!r} is named twice")
                seen.add(name)
        validate_identifier(self.dead)
        if self.dead in seen:
            raise ConfigError(f"table {self.dead!r} is named twice")

    def lane(self, lane: Lane) -> tuple[str, ...]:
        if lane is Lane.EMERGENCY:
            return self.emergency
        if lane is Lane.TIMED:
            return self.timed
        return self.normal

    def all(self) -> list[tuple[Lane, str]]:
        return [(lane, name) for lane in Lane for name in self.lane(lane)]


@dataclass(frozen=True, slots=True)
class QueueSettings:
    dialect: str
    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str = field(default="", repr=False)
    database: str = "test"
    path: str = DEFAULT_SQLITE_PATH  # sqlite
    tables: Tables = Tables()
    pool_size: int = 10
    max_destination: int = 40
    connect_timeout: float = 5.0
    shards: tuple[tuple[str, int], ...] = ()  # 2+ (host, port): a sharded queue
    # The nodes of one cluster (?cluster=failover), in the URL's order: the pool uses
    # one and moves to the next when it fails. host/port are the first.
    nodes: tuple[tuple[str, int], ...] = ()
    # sqlite: make the file (and its directory) when it is missing. False: open an
    # existing file only, and say that the queue does not exist (`mvalve stats`...).
    create_file: bool = True

    @classmethod
    def from_url(cls, url: str) -> QueueSettings:
        return parse_queue_url(url)

    def safe_url(self) -> str:
        """The URL with the password masked, for logs and errors."""
        if self.dialect in ("sqlite",):
            return f"sqlite:///{self.path}"
        if self.dialect == "memory":
            return "memory://"
        auth = self.user + (":***" if self.password else "")
        if self.shards:
            hosts = ",".join(hostport(h, p) for h, p in self.shards)
            return f"mysql+{self.dialect}://{auth}@{hosts}/{self.database}"
        if self.nodes:
            hosts = ",".join(hostport(h, p) for h, p in self.nodes)
            return f"mysql+{self.dialect}://{auth}@{hosts}/{self.database}?cluster=failover"
        return f"mysql+{self.dialect}://{auth}@{hostport(self.host, self.port)}/{self.database}"

    def shard_settings(self) -> list[QueueSettings]:
        """One single-server settings per shard (just `[self]` when not sharded)."""
        if not self.shards:
            return [self]
        return [replace(self, host=h, port=p, shards=()) for h, p in self.shards]

    def __repr__(self) -> str:
        return f"QueueSettings({self.safe_url()!r})"


@dataclass(frozen=True, slots=True)
class StoreSettings:
    kind: str
    servers: tuple[tuple[str, int], ...] = ()
    namespace: str = "mvalve"
    pool_size: int = 8

    @classmethod
    def from_url(cls, url: str) -> StoreSettings:
        return parse_store_url(url)


def _query(raw: str) -> dict[str, str]:
    try:
        return dict(parse_qsl(raw, keep_blank_values=False, strict_parsing=bool(raw)))
    except ValueError:
        raise ConfigError("URL query string is malformed") from None


def _names(value: str) -> tuple[str, ...]:
    return tuple(validate_identifier(v.strip()) for v in value.split(",") if v.strip())


def _int(opts: dict[str, str], key: str, default: int) -> int:
    try:
        value = int(opts.pop(key, default))
    except ValueError:
        raise ConfigError(f"URL option {key} must be an integer") from None
    if value < 1:
        raise ConfigError(f"URL option {key} must be positive")
    return value


_DB = re.compile(r"[A-Za-z0-9_$-]{1,64}\Z")


def _database(path: str) -> str:
    name = unquote(path.lstrip("/")) or "test"
    if not _DB.match(name):  # e.g. "mysql:///user:pw@host/db": never echo it
        raise ConfigError("the URL's database name is not valid (is there an extra '/'?)")
    return name


def hostport(host: str, port: int) -> str:
    """``host:port`` as URLs, logs and shard names write it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_list(netloc: str) -> tuple[tuple[str, int], ...]:
    """The ``h1:3306,h2:3307`` part of a netloc as (host, port) pairs (one pair when
    there is no comma). Raises ConfigError naming the bad item (never the userinfo)."""
    hostlist = netloc.rpartition("@")[2]
    out: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        if not item.strip():
            raise ConfigError("the URL's host list has an empty entry (a stray comma?)")
        try:
            sub = urlsplit("//" + item.strip())
            host, port = sub.hostname, sub.port or 3306
        except ValueError:
            raise ConfigError(f"the URL's host {item!r} is malformed (host[:port])") from None
        if not host or sub.path or sub.query or sub.fragment:
            raise ConfigError(f"the URL's host {item!r} is malformed (host[:port])")
        if (host, port) in out:
            raise ConfigError(f"the URL names {hostport(host, port)} twice")
        out.append((host, port))
    return tuple(out)


def _scheme(url: str) -> str:
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError("a backend URL looks like scheme://..., e.g. mysql+innodb://root@host/db")
    return url.split("://", 1)[0].lower()


# Queue URL scheme -> dialect. The unknown-scheme error lists every key, in this order.
_QUEUE_SCHEMES = {"mysql+innodb": "innodb", "mysql": "innodb", "mariadb": "innodb",
                 "mysql+q4m": "q4m", "sqlite": "sqlite", "memory": "memory"}  # fmt: skip


def parse_queue_url(url: str) -> QueueSettings:
    scheme = _scheme(url)
    dialect = _QUEUE_SCHEMES.get(scheme)
    if dialect is None:
        known = [f"{k}:///" if k == "sqlite" else f"{k}://" for k in _QUEUE_SCHEMES]
        raise ConfigError(
            f"unknown queue URL scheme {scheme!r}: use {', '.join(known[:-1])} or {known[-1]}"
        )
    try:
        parts = urlsplit(url)
        several = "," in parts.netloc.rpartition("@")[2]  # several hosts: checked below
        if not several:
            parts.hostname  # noqa: B018 - raises ValueError on a malformed IPv6 host
    except ValueError:
        raise ConfigError(f"the {scheme}:// URL is malformed") from None
    opts = _query(parts.query)
    tables = Tables()
    kw: dict[str, tuple[str, ...] | str] = {}
    for lane in ("emergency", "timed", "normal"):
        if lane in opts:
            kw[lane] = _names(opts.pop(lane))
    if "dead" in opts:
        kw["dead"] = validate_identifier(opts.pop("dead"))
    if kw:
        tables = replace(tables, **kw)  # type: ignore[arg-type]
    cluster = opts.pop("cluster", None) if dialect in ("innodb", "q4m") else None
    if cluster is not None and cluster != "failover":
        raise ConfigError("URL option cluster takes one value: cluster=failover")
    if cluster and dialect != "innodb":
        raise ConfigError("cluster=failover is supported by mysql+innodb:// only")
    pool_size = _int(opts, "pool_size", 10)
    max_destination = _int(opts, "max_destination", 40)
    settings = QueueSettings(dialect, tables=tables, pool_size=pool_size,
                             max_destination=max_destination)  # fmt: skip
    if dialect == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        settings = replace(settings, path=unquote(path) or DEFAULT_SQLITE_PATH)
    elif dialect in ("innodb", "q4m"):
        shards: tuple[tuple[str, int], ...] = ()
        nodes: tuple[tuple[str, int], ...] = ()
        if several or cluster:
            if dialect != "innodb":
                raise ConfigError("several hosts (shards) are supported by mysql+innodb:// only")
            hosts = _host_list(parts.netloc)
            host, port = hosts[0]
            if cluster:
                nodes = hosts  # one cluster: the nodes hold the same tables
            else:
                shards = hosts
        else:
            try:
                host, port = parts.hostname or "127.0.0.1", parts.port or 3306
            except ValueError:
                raise ConfigError("the URL's port is not a number") from None
        settings = replace(
            settings,
            host=host,
            port=port,
            shards=shards,
            nodes=nodes,
            user=unquote(parts.username or "root"),
            password=unquote(parts.password or ""),
            database=_database(parts.path),
        )
    if opts:
        raise ConfigError(f"unknown URL option(s): {', '.join(sorted(opts))}")
    return settings


def parse_store_url(url: str) -> StoreSettings:
    scheme = _scheme(url)
    if scheme == "memory":
        return StoreSettings("memory")
    if scheme != "memcached":
        raise ConfigError(f"unknown store URL scheme {scheme!r}: use memcached:// or memory://")
    rest = url.split("://", 1)[1]
    hosts, _, query = rest.partition("?")
    if "@" in hosts:
        raise ConfigError("memcached URLs take no user or password")
    opts = _query(query)
    servers: list[tuple[str, int]] = []
    for item in hosts.strip("/").split(","):
        if not item:
            continue
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "11211")
        try:
            servers.append((host or "127.0.0.1", int(port)))
        except ValueError:
            raise ConfigError(f"memcached server {item!r} has a bad port") from None
    if not servers:
        servers = [("127.0.0.1", 11211)]
    namespace = opts.pop("namespace", "mvalve")
    pool_size = _int(opts, "pool_size", 8)
    if opts:
        raise ConfigError(f"unknown URL option(s): {', '.join(sorted(opts))}")
    return StoreSettings("memcached", tuple(servers), namespace, pool_size)
