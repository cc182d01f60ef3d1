"""SQL subset and queue_wait condition language for the Q4M emulator.

Everything here is pure (no I/O, no asyncio): a tokenizer that works on the
query *as bytes* (the emulator decodes COM_QUERY as latin1, one char per
byte, so ``_binary'...'`` payloads survive untouched), a recursive-descent
parser for the few statements a q4m dialect sends, (the
``'table:expr'`` conditions of queue_wait live in ``cond``).

Parsing returns ``None`` for anything it does not own (``SET NAMES``,
``SELECT @@version`` ...): the caller hands those to mysql-mimic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class SqlError(Exception):
    """A statement the emulator refuses; ``code`` is a MySQL error number."""

    def __init__(self, msg: str, code: int = 1064) -> None:
        super().__init__(msg)
        self.msg = msg
        self.code = code


# -- tokens


@dataclass(frozen=True)
class Tok:
    kind: str  # ident, qident, str, num, op, end
    text: str
    start: int
    end: int
    value: bytes = b""  # decoded string/hex literal bytes
    binary: bool = False  # _binary'..' or X'..'
    quoted: bool = False  # `ident`: never a keyword


@dataclass(frozen=True)
class Str:
    """A string literal as the bytes the client sent; ``binary``: no charset."""

    raw: bytes
    binary: bool = False


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()
NOW = "CURRENT_TIMESTAMP"

_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a"}
_TOKEN = re.compile(
    r"""(?P<ws>\s+|--[ \t][^\n]*|--$|\#[^\n]*|/\*.*?\*/)
    | (?P<hex>[xX]'[0-9a-fA-F]*'|0x[0-9a-fA-F]+)
    | (?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<qident>`(?:[^`]|``)*`)
    | (?P<ident>[A-Za-z_$\x80-\xff][A-Za-z0-9_$\x80-\xff]*)
    | (?P<op><=>|<=|>=|<>|!=|<<|>>|\|\||&&|[(),.*=<>+\-/%&|^~;:!@?])""",
    re.X | re.S,
)


def _scan_string(sql: str, i: int) -> tuple[str, int]:
    quote, out, i = sql[i], [], i + 1
    while i < len(sql):
        c = sql[i]
        if c == "\\" and i + 1 < len(sql):
            n = sql[i + 1]
            out.append(_ESCAPES.get(n, "\\" + n if n in "%_" else n))
            i += 2
        elif c == quote:
            if sql.startswith(quote, i + 1):
                out.append(quote)
                i += 2
            else:
                return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    raise SqlError("unterminated string literal")


def tokenize(sql: str) -> list[Tok]:
    """``sql`` must be latin1-decoded bytes: literal values come back as bytes."""
    toks: list[Tok] = []
    i = 0
    while i < len(sql):
        if sql[i] in "'\"":
            text, j = _scan_string(sql, i)
            binary = bool(toks) and toks[-1].kind == "ident" and toks[-1].text.lower() == "_binary"
            if toks and toks[-1].kind == "ident" and toks[-1].text.startswith("_"):
                toks.pop()  # a charset introducer (_binary, _utf8mb4 ...)
            toks.append(Tok("str", sql[i:j], i, j, text.encode("latin1"), binary))
            i = j
            continue
        m = _TOKEN.match(sql, i)
        if m is None:
            raise SqlError(f"syntax error near {sql[i : i + 20]!r}")
        kind, text = m.lastgroup or "", m.group()
        i = m.end()
        if kind == "ws":
            continue
        if kind == "hex":
            digits = text[2:-1] if text[0] in "xX" else text[2:]
            toks.append(Tok("str", text, m.start(), i, bytes.fromhex(digits), True))
        elif kind == "qident":
            toks.append(Tok("ident", text[1:-1].replace("``", "`"), m.start(), i, quoted=True))
        else:
            toks.append(Tok(kind, text, m.start(), i))
    toks.append(Tok("end", "", len(sql), len(sql)))
    return toks


# -- statements


@dataclass
class ColumnDef:
    name: str
    kind: str  # int, float, binary, text, datetime
    nullable: bool = True
    default: Any = None  # python value, Str, NOW, or DEFAULT (= no default)
    sql_type: str = ""  # as declared: VARCHAR, LONGBLOB ...


@dataclass
class CreateTable:
    name: str
    columns: list[ColumnDef]
    if_not_exists: bool = False


@dataclass
class DropTable:
    names: list[str]
    if_exists: bool = False


@dataclass
class Truncate:
    name: str


@dataclass
class Insert:
    table: str
    columns: list[str] | None
    rows: list[list[Any]]


@dataclass
class Cond:
    column: str
    op: str  # = != < <= > >= isnull notnull
    value: Any = None


@dataclass
class SelectItem:
    kind: str  # star, column, count, func
    text: str  # label: alias or source text
    name: str = ""  # column or function name (lower case)
    args: list[Any] = field(default_factory=list)


@dataclass
class Select:
    items: list[SelectItem]
    table: str | None = None
    where: list[Cond] = field(default_factory=list)
    group_by: list[str] = field(default_factory=list)
    limit: int | None = None


@dataclass
class Delete:
    table: str
    where: list[Cond] = field(default_factory=list)


@dataclass
class Update:
    table: str


@dataclass
class Noop:
    what: str


Statement = CreateTable | DropTable | Truncate | Insert | Select | Delete | Update | Noop

_KINDS = {
    "int": "TINYINT SMALLINT MEDIUMINT INT INTEGER BIGINT BOOL BOOLEAN BIT YEAR",
    "float": "FLOAT DOUBLE REAL DECIMAL NUMERIC DEC",
    "binary": "BLOB TINYBLOB MEDIUMBLOB LONGBLOB BINARY VARBINARY",
    "text": "CHAR VARCHAR TEXT TINYTEXT MEDIUMTEXT LONGTEXT ENUM SET JSON",
    "datetime": "DATETIME TIMESTAMP DATE TIME",
}
TYPE_KIND = {t: kind for kind, names in _KINDS.items() for t in names.split()}
_NO_INDEX = {"PRIMARY", "KEY", "INDEX", "UNIQUE", "FULLTEXT", "SPATIAL", "AUTO_INCREMENT"}
_QUEUE_FUNCS = {"queue_wait", "queue_end", "queue_abort", "queue_rowid", "queue_stats"}
REL_OPS = {"=", "!=", "<>", "<", "<=", ">", ">="}


def parse(sql: str) -> Statement | None:
    """Parse one statement, or return None when mysql-mimic should handle it."""
    toks = tokenize(sql)
    while len(toks) > 1 and toks[-2].kind == "op" and toks[-2].text == ";":
        del toks[-2]
    return _Parser(sql, toks).statement()


class _Parser:
    def __init__(self, sql: str, toks: list[Tok]) -> None:
        self.sql, self.toks, self.i = sql, toks, 0

    # -- helpers
    @property
    def tok(self) -> Tok:
        return self.toks[self.i]

    def kw(self, *words: str) -> bool:
        t = self.tok
        return t.kind == "ident" and not t.quoted and t.text.upper() in words

    def accept(self, *words: str) -> bool:
        if self.kw(*words) or (self.tok.kind == "op" and self.tok.text in words):
            self.i += 1
            return True
        return False

    def expect(self, *words: str) -> None:
        if not self.accept(*words):
            raise SqlError(f"expected {' '.join(words)} near {self.tok.text!r}")

    def ident(self) -> str:
        if self.tok.kind != "ident":
            raise SqlError(f"expected a name near {self.tok.text!r}")
        self.i += 1
        return self.toks[self.i - 1].text

    def table_name(self) -> str:
        name = self.ident()
        return self.ident() if self.accept(".") else name  # db.tbl -> tbl

    def done(self) -> None:
        if self.tok.kind != "end":
            raise SqlError(f"unsupported SQL near {self.tok.text!r}")

    def literal(self) -> Any:
        t = self.tok
        if t.kind == "str":
            raw, binary = b"", t.binary
            while self.tok.kind == "str":  # 'a' 'b' concatenates
                raw += self.tok.value
                self.i += 1
            return Str(raw, binary)
        if self.accept("-", "+"):
            value = self.literal()
            if not isinstance(value, int | float):
                raise SqlError("a sign needs a number")
            return -value if t.text == "-" else value
        self.i += 1
        if t.kind == "num":
            return float(t.text) if any(c in t.text for c in ".eE") else int(t.text)
        word = t.text.upper() if t.kind == "ident" and not t.quoted else ""
        if word in ("NULL", "TRUE", "FALSE"):
            return {"NULL": None, "TRUE": 1, "FALSE": 0}[word]
        if word == "DEFAULT":
            return DEFAULT
        if word in ("CURRENT_TIMESTAMP", "NOW", "LOCALTIMESTAMP"):
            if self.accept("("):
                self.expect(")")
            return NOW
        raise SqlError(f"only literal values are supported, near {t.text!r}")

    # -- statements
    def statement(self) -> Statement | None:
        if self.accept("CREATE"):
            return self.create() if self.accept("TABLE") else None
        if self.accept("DROP"):
            return self.drop() if self.accept("TABLE") else None
        if self.accept("TRUNCATE"):
            self.accept("TABLE")
            name = self.table_name()
            self.done()
            return Truncate(name)
        if self.accept("INSERT"):
            return self.insert()
        if self.accept("DELETE"):
            return self.delete()
        if self.accept("UPDATE"):
            return Update(self.table_name())
        if self.accept("SELECT"):
            return self.select()
        if self.kw("BEGIN", "START", "COMMIT", "ROLLBACK"):
            return Noop(self.tok.text.upper())
        if self.accept("SET"):  # aiomysql sends sql_mode unquoted: keep it from sqlglot
            while self.accept("@", "SESSION", "LOCAL", "."):
                pass
            return Noop("SET sql_mode") if self.kw("SQL_MODE") else None
        return None

    def create(self) -> CreateTable:
        if_not_exists = False
        if self.accept("IF"):
            self.expect("NOT")
            self.expect("EXISTS")
            if_not_exists = True
        name = self.table_name()
        self.expect("(")
        columns = [self.column_def()]
        while self.accept(","):
            columns.append(self.column_def())
        self.expect(")")
        engine = ""
        while self.tok.kind != "end":  # table options: ENGINE=QUEUE CHARSET=...
            if self.accept(","):
                continue
            option = self.ident().upper()
            if option == "DEFAULT":
                option = self.ident().upper()
            if option == "CHARACTER":
                self.expect("SET")
            self.accept("=")
            value = self.tok.text
            self.i += 1
            if option == "ENGINE":
                engine = value.upper()
        if engine != "QUEUE":
            raise SqlError("the Q4M emulator only creates ENGINE=QUEUE tables", 1286)
        return CreateTable(name, columns, if_not_exists)

    def column_def(self) -> ColumnDef:
        if self.kw(*_NO_INDEX, "CONSTRAINT", "FOREIGN", "CHECK"):
            raise SqlError("Too many keys specified; max 0 keys allowed", 1069)
        name, type_name = self.ident(), self.ident().upper()
        kind = TYPE_KIND.get(type_name)
        if kind is None:
            raise SqlError(f"column type {type_name} is not supported by the emulator")
        col = ColumnDef(name, kind, default=DEFAULT, sql_type=type_name)
        if self.accept("("):  # VARCHAR(255), ENUM('a','b'), DECIMAL(10,2)
            while not self.accept(")"):
                if self.tok.kind == "end":
                    raise SqlError("unbalanced parentheses in column type")
                self.i += 1
        while not (self.tok.kind == "op" and self.tok.text in ",)"):
            if self.kw(*_NO_INDEX):
                raise SqlError("Too many keys specified; max 0 keys allowed", 1069)
            if self.accept("NOT"):
                self.expect("NULL")
                col.nullable = False
            elif self.accept("DEFAULT"):
                col.default = self.literal()
            elif self.accept("ON"):  # ON UPDATE CURRENT_TIMESTAMP
                self.expect("UPDATE")
                self.literal()
            elif self.accept("CHARACTER", "CHARSET", "COLLATE", "COMMENT"):
                self.accept("SET")
                self.i += 1
            elif not self.accept("NULL", "UNSIGNED", "SIGNED", "ZEROFILL", "BINARY"):
                raise SqlError(f"unsupported column attribute {self.tok.text!r}")
        return col

    def drop(self) -> DropTable:
        if_exists = False
        if self.accept("IF"):
            self.expect("EXISTS")
            if_exists = True
        names = [self.table_name()]
        while self.accept(","):
            names.append(self.table_name())
        self.done()
        return DropTable(names, if_exists)

    def insert(self) -> Insert:
        self.accept("IGNORE")
        self.accept("INTO")
        table = self.table_name()
        columns = None
        if self.accept("("):
            columns = [self.ident()]
            while self.accept(","):
                columns.append(self.ident())
            self.expect(")")
        self.expect("VALUES", "VALUE")
        rows = [self.values_row()]
        while self.accept(","):
            rows.append(self.values_row())
        self.done()
        return Insert(table, columns, rows)

    def values_row(self) -> list[Any]:
        self.expect("(")
        row = [self.literal()]
        while self.accept(","):
            row.append(self.literal())
        self.expect(")")
        return row

    def where(self) -> list[Cond]:
        conds: list[Cond] = []
        if not self.accept("WHERE"):
            return conds
        while True:
            column = self.ident()
            if self.accept("."):
                column = self.ident()
            if self.accept("IS"):
                conds.append(Cond(column, "notnull" if self.accept("NOT") else "isnull"))
                self.expect("NULL")
            elif self.tok.kind == "op" and self.tok.text in REL_OPS:
                op = "!=" if self.tok.text == "<>" else self.tok.text
                self.i += 1
                conds.append(Cond(column, op, self.literal()))
            else:
                raise SqlError(f"unsupported WHERE condition near {self.tok.text!r}")
            if not self.accept("AND"):
                return conds

    def delete(self) -> Delete:
        self.expect("FROM")
        stmt = Delete(self.table_name(), self.where())
        self.done()
        return stmt

    def select(self) -> Select | None:
        items = [self.select_item()]
        while self.accept(","):
            items.append(self.select_item())
        chosen = [item for item in items if item is not None]
        funcs = sum(item.kind == "func" for item in chosen)
        if funcs:
            if funcs != len(items):
                raise SqlError("queue functions cannot be mixed with other columns")
            self.done()
            return Select(chosen)
        if len(chosen) != len(items) or not self.accept("FROM"):
            return None  # SELECT @@version, SELECT 1, ...: mysql-mimic's job
        if self.kw("INFORMATION_SCHEMA", "PERFORMANCE_SCHEMA", "MYSQL"):
            return None
        stmt = Select(chosen, self.table_name(), self.where())
        if self.accept("GROUP"):
            self.expect("BY")
            stmt.group_by = [self.ident()]
            while self.accept(","):
                stmt.group_by.append(self.ident())
        if self.accept("LIMIT"):
            limit = self.literal()
            if not isinstance(limit, int):
                raise SqlError("LIMIT needs an integer")
            stmt.limit = limit
        self.done()
        return stmt

    def select_item(self) -> SelectItem | None:
        start, nxt = self.tok.start, self.toks[min(self.i + 1, len(self.toks) - 1)]
        if self.accept("*"):
            item = SelectItem("star", "*")
        elif self.tok.kind == "ident" and nxt.kind == "op" and nxt.text == "(":
            name = self.ident().lower()
            self.i += 1
            if name == "count":
                self.expect("*")
                self.expect(")")
                item = SelectItem("count", "", name)
            elif name in _QUEUE_FUNCS:
                args = [] if self.accept(")") else self.func_args()
                item = SelectItem("func", "", name, args)
            else:
                return None
        elif self.tok.kind == "ident":
            item = SelectItem("column", "", self.ident())
            if self.accept("."):  # tbl.col or tbl.*
                item = SelectItem("star", "*") if self.accept("*") else item
                item.name = "" if item.kind == "star" else self.ident()
        else:
            return None
        source = self.sql[start : self.toks[self.i - 1].end]
        item.text = item.name if item.kind == "column" else source  # MySQL's column label
        if self.accept("AS") or (self.tok.kind == "ident" and not self.kw("FROM")):
            item.text = self.literal().raw.decode() if self.tok.kind == "str" else self.ident()
        return item

    def func_args(self) -> list[Any]:
        args = [self.literal()]
        while self.accept(","):
            args.append(self.literal())
        self.expect(")")
        return args
