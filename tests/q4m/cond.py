"""The condition language of ``queue_wait('table:expr')``, as Q4M's
queue_cond grammar defines it: integer columns and literals (decimal, 0x
hex, 0-prefixed octal), NULL, ``= != <> < <= > >=``, ``IS [NOT]
TRUE/FALSE/NULL``, ``+ - * div % mod``, ``| & ^ ~ << >>``, ``and && or ||
xor not``, parentheses; signed 64-bit arithmetic and SQL NULL logic.

The text is compiled into closures over a row mapping: no ``eval``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from tests.q4m.sql import REL_OPS, SqlError

Value = int | None
Expr = Callable[[Mapping[str, Value]], Value]

_COND_TOKEN = re.compile(
    r"""\s*(?:(?P<hex>0[xX][0-9a-fA-F]+)|(?P<num>\d+)|(?P<qident>`(?:[^`]|``)*`)
    |(?P<ident>[A-Za-z_$][A-Za-z0-9_$]*)
    |(?P<op>\|\||&&|<=|>=|<>|!=|<<|>>|[=<>|&+\-*%^~()]))""",
    re.X,
)
_RESERVED = {"OR", "XOR", "AND", "NOT", "IS", "TRUE", "FALSE", "NULL", "DIV", "MOD"}
_INT64 = 1 << 64


def _wrap(x: int) -> int:
    """Signed 64-bit overflow, as the engine's ``long long`` arithmetic."""
    return (x + (1 << 63)) % _INT64 - (1 << 63)


def _truth(v: Value) -> bool:
    return v is not None and v != 0


def _tdiv(x: int, y: int) -> int:
    q = abs(x) // abs(y)
    return q if (x < 0) == (y < 0) else -q


_BINARY: dict[str, Callable[[int, int], Value]] = {
    "=": lambda x, y: int(x == y),
    "!=": lambda x, y: int(x != y),
    "<>": lambda x, y: int(x != y),
    "<": lambda x, y: int(x < y),
    "<=": lambda x, y: int(x <= y),
    ">": lambda x, y: int(x > y),
    ">=": lambda x, y: int(x >= y),
    "|": lambda x, y: _wrap(x | y),
    "&": lambda x, y: _wrap(x & y),
    "^": lambda x, y: _wrap(x ^ y),
    "<<": lambda x, y: _wrap(x << y) if 0 <= y < 64 else 0,
    ">>": lambda x, y: x >> y if 0 <= y < 64 else (0 if x >= 0 else -1),
    "+": lambda x, y: _wrap(x + y),
    "-": lambda x, y: _wrap(x - y),
    "*": lambda x, y: _wrap(x * y),
    "DIV": lambda x, y: _wrap(_tdiv(x, y)) if y else None,
    "%": lambda x, y: x - y * _tdiv(x, y) if y else None,
    "XOR": lambda x, y: int((x != 0) != (y != 0)),
}
_BINARY["MOD"] = _BINARY["%"]


def _strict(op: str, a: Expr, b: Expr) -> Expr:
    fn = _BINARY[op]

    def run(row: Mapping[str, Value]) -> Value:
        x, y = a(row), b(row)
        return None if x is None or y is None else fn(x, y)

    return run


def _or(a: Expr, b: Expr) -> Expr:
    def run(row: Mapping[str, Value]) -> Value:
        x = a(row)
        if _truth(x):
            return 1
        y = b(row)
        return 1 if _truth(y) else (None if x is None or y is None else 0)

    return run


def _and(a: Expr, b: Expr) -> Expr:
    def run(row: Mapping[str, Value]) -> Value:
        x, y = a(row), b(row)
        return None if x is None and y is None else int(_truth(x) and _truth(y))

    return run


def _unary(fn: Callable[[int], int], a: Expr) -> Expr:
    return lambda row: None if (x := a(row)) is None else fn(x)


def _is(what: str, negate: bool, a: Expr) -> Expr:
    tests: dict[str, Callable[[Value], bool]] = {
        "TRUE": lambda v: v is not None and v != 0,
        "FALSE": lambda v: v == 0,
        "NULL": lambda v: v is None,
    }
    test = tests[what]
    return lambda row: int(test(a(row)) != negate)


class _CondParser:
    """Q4M's grammar, loosest first: or, xor, and, not, comparison/IS, |, &,
    shifts, + -, * div % mod, ^, unary (- ~ literal column parentheses)."""

    def __init__(self, text: str, columns: set[str]) -> None:
        self.columns = columns
        self.toks: list[tuple[str, str]] = []
        pos = 0
        while text[pos:].strip():
            m = _COND_TOKEN.match(text, pos)
            if m is None:
                raise SqlError(f"bad queue_wait condition near {text[pos:]!r}")
            kind, value = m.lastgroup or "", m.group(m.lastgroup or 0)
            if kind == "ident" and value.upper() in _RESERVED:
                kind, value = "kw", value.upper()
            self.toks.append((kind, value))
            pos = m.end()
        self.toks.append(("end", ""))
        self.i = 0

    def take(self, *values: str) -> str | None:
        kind, value = self.toks[self.i]
        if kind in ("op", "kw") and value in values:
            self.i += 1
            return value
        return None

    def parse(self) -> Expr:
        expr = self.or_expr()
        if self.toks[self.i][0] != "end":
            raise SqlError(f"bad queue_wait condition near {self.toks[self.i][1]!r}")
        return expr

    def chain(self, sub: Callable[[], Expr], ops: dict[str, str]) -> Expr:
        expr = sub()
        while (op := self.take(*ops)) is not None:
            rhs, name = sub(), ops[op]
            combine = {"OR": _or, "AND": _and}.get(name)
            expr = combine(expr, rhs) if combine else _strict(name, expr, rhs)
        return expr

    def or_expr(self) -> Expr:
        return self.chain(self.xor_expr, {"||": "OR", "OR": "OR"})

    def xor_expr(self) -> Expr:
        return self.chain(self.and_expr, {"XOR": "XOR"})

    def and_expr(self) -> Expr:
        return self.chain(self.not_expr, {"&&": "AND", "AND": "AND"})

    def not_expr(self) -> Expr:
        if self.take("NOT"):
            return _unary(lambda x: int(x == 0), self.not_expr())
        return self.rel_expr()

    def rel_expr(self) -> Expr:
        expr = self.bitor()
        while True:
            if (op := self.take(*REL_OPS)) is not None:
                expr = _strict(op, expr, self.bitor())
            elif self.take("IS"):
                negate = self.take("NOT") is not None
                what = self.take("TRUE", "FALSE", "NULL")
                if what is None:
                    raise SqlError("IS needs TRUE, FALSE or NULL")
                expr = _is(what, negate, expr)
            else:
                return expr

    def bitor(self) -> Expr:
        return self.chain(self.bitand, {"|": "|"})

    def bitand(self) -> Expr:
        return self.chain(self.shift, {"&": "&"})

    def shift(self) -> Expr:
        return self.chain(self.add, {"<<": "<<", ">>": ">>"})

    def add(self) -> Expr:
        return self.chain(self.mul, {"+": "+", "-": "-"})

    def mul(self) -> Expr:
        return self.chain(self.bitxor, {"*": "*", "DIV": "DIV", "%": "%", "MOD": "MOD"})

    def bitxor(self) -> Expr:
        return self.chain(self.unary, {"^": "^"})

    def unary(self) -> Expr:
        if self.take("-"):
            return _unary(lambda x: _wrap(-x), self.unary())
        if self.take("~"):
            return _unary(lambda x: _wrap(~x), self.unary())
        if self.take("("):
            expr = self.or_expr()
            if not self.take(")"):
                raise SqlError("unbalanced parentheses in queue_wait condition")
            return expr
        if self.take("NULL"):
            return lambda row: None
        kind, value = self.toks[self.i]
        self.i += 1
        if kind in ("hex", "num"):
            base = 16 if kind == "hex" else 8 if re.fullmatch(r"0[0-7]+", value) else 10
            number = int(value, base)
            if number >= 1 << 63:
                raise SqlError(f"integer out of range in queue_wait condition: {value}")
            return lambda row: number
        if kind in ("ident", "qident"):
            name = (value[1:-1].replace("``", "`") if kind == "qident" else value).lower()
            if name not in self.columns:
                raise SqlError(f"unknown or non-integer column in queue_wait condition: {value}")
            return lambda row: row[name]
        raise SqlError(f"bad queue_wait condition near {value!r}")


def compile_condition(text: str, int_columns: set[str]) -> Callable[[Mapping[str, Value]], bool]:
    """Compile a ``queue_wait('tbl:expr')`` condition over integer columns
    (lower-case names) into a predicate on a row mapping."""
    expr = _CondParser(text, int_columns).parse()
    return lambda row: _truth(expr(row))
