"""TOML documents (training configs, kohya's dataset files) on Python 3.10, which has no ``tomllib``.

Python 3.11+ uses the standard library's reader. On 3.10 (the WebUI's own Python) this module's
parser reads TOML 1.0: tables, arrays of tables, dotted and quoted keys, inline tables, every string
form, integers, floats, booleans, dates and times. tests/test_toml_reader.py checks it against
``tomllib`` on the same documents.
"""
from __future__ import annotations

import datetime
import re
from typing import Any, BinaryIO

try:
    import tomllib as _stdlib
except ModuleNotFoundError:  # Python 3.10
    _stdlib = None


class TOMLDecodeError(ValueError):
    """A document that is not valid TOML; the message names the line."""


def load(f: BinaryIO) -> dict[str, Any]:
    return loads(f.read().decode("utf-8"))


def loads(text: str) -> dict[str, Any]:
    if _stdlib is not None:
        try:
            return _stdlib.loads(text)
        except _stdlib.TOMLDecodeError as e:
            raise TOMLDecodeError(str(e)) from None
    return parse(text)


_BARE = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
_DATETIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:([Zz])|([+-])(\d{2}):(\d{2}))?)?")
_LINE_ENDING_BACKSLASH = re.compile(r"\\[ \t]*\r?\n")
_TIME = re.compile(r"(\d{2}):(\d{2}):(\d{2})(\.\d+)?")
_NUMBER = re.compile(
    r"0x[0-9A-Fa-f](?:_?[0-9A-Fa-f])*|0o[0-7](?:_?[0-7])*|0b[01](?:_?[01])*"
    r"|[+-]?(?:inf|nan)"
    r"|[+-]?(?:0|[1-9](?:_?\d)*)(?:\.\d(?:_?\d)*)?(?:[eE][+-]?\d(?:_?\d)*)?")


def parse(text: str) -> dict[str, Any]:
    """A TOML 1.0 document as nested dicts and lists (what ``tomllib.loads`` returns)."""
    return _Parser(text).document()


class _Parser:
    def __init__(self, text: str):
        self.s = text
        self.i = 0
        self.root: dict[str, Any] = {}
        self.frozen: set[int] = set()     # ids of inline tables and arrays: closed to later keys
        self.defined: set[int] = set()    # ids of tables opened by a [header]
        self.implicit: set[int] = set()   # ids of tables created by dotted keys inside key/value lines

    # ---- scanning ----------------------------------------------------------------------------
    def error(self, msg: str) -> TOMLDecodeError:
        line = self.s.count("\n", 0, self.i) + 1
        col = self.i - (self.s.rfind("\n", 0, self.i) + 1) + 1
        return TOMLDecodeError(f"{msg} (at line {line}, column {col})")

    def peek(self, n: int = 1) -> str:
        return self.s[self.i:self.i + n]

    def skip_ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def skip_comment(self) -> None:
        if self.peek() == "#":
            end = self.s.find("\n", self.i)
            end = len(self.s) if end < 0 else end
            for c in self.s[self.i + 1:end].rstrip("\r"):
                if (ord(c) < 32 and c != "\t") or c == "\x7f":
                    raise self.error("control character in a comment")
            self.i = end

    def skip_blank(self) -> None:
        """Whitespace, newlines and comments (inside arrays)."""
        while True:
            self.skip_ws()
            self.skip_comment()
            if self.peek() == "\n":
                self.i += 1
            elif self.peek(2) == "\r\n":
                self.i += 2
            else:
                return

    def end_of_line(self) -> None:
        self.skip_ws()
        self.skip_comment()
        if self.i >= len(self.s):
            return
        if self.peek() == "\n":
            self.i += 1
        elif self.peek(2) == "\r\n":
            self.i += 2
        else:
            raise self.error("expected the end of the line")

    def expect(self, c: str) -> None:
        if self.peek() != c:
            raise self.error(f"expected {c!r}")
        self.i += 1

    # ---- document ----------------------------------------------------------------------------
    def document(self) -> dict[str, Any]:
        table = self.root
        while True:
            self.skip_blank()
            if self.i >= len(self.s):
                return self.root
            if self.peek(2) == "[[":
                self.i += 2
                table = self.array_table(self.key())
                self.skip_ws()
                self.expect("]")
                self.expect("]")
            elif self.peek() == "[":
                self.i += 1
                table = self.header_table(self.key())
                self.skip_ws()
                self.expect("]")
            else:
                self.key_value(table)
            self.end_of_line()

    def walk(self, table: dict, keys: list[str], for_header: bool) -> dict:
        """The table at ``keys`` below ``table``, creating missing ones; the last array of tables is entered."""
        for k in keys:
            if k not in table:
                table[k] = {}
                if not for_header:
                    self.implicit.add(id(table[k]))
            node = table[k]
            if isinstance(node, list) and for_header and id(node) not in self.frozen:
                node = node[-1]
            if not isinstance(node, dict) or id(node) in self.frozen:
                raise self.error(f"key {k!r} is already a value")
            if not for_header and id(node) in self.defined:
                raise self.error(f"table {k!r} is already defined by a header")
            table = node
        return table

    def header_table(self, keys: list[str]) -> dict:
        parent = self.walk(self.root, keys[:-1], True)
        k = keys[-1]
        if k in parent:
            node = parent[k]
            if not isinstance(node, dict) or id(node) in self.defined or id(node) in self.frozen \
                    or id(node) in self.implicit:
                raise self.error(f"table {'.'.join(keys)!r} is defined twice")
        else:
            node = parent[k] = {}
        self.defined.add(id(node))
        return node

    def array_table(self, keys: list[str]) -> dict:
        parent = self.walk(self.root, keys[:-1], True)
        k = keys[-1]
        arr = parent.setdefault(k, [])
        if not isinstance(arr, list) or id(arr) in self.frozen:
            raise self.error(f"{'.'.join(keys)!r} is not an array of tables")
        node: dict = {}
        arr.append(node)
        self.defined.add(id(node))
        return node

    def key_value(self, table: dict) -> None:
        keys = self.key()
        self.skip_ws()
        self.expect("=")
        self.skip_ws()
        value = self.value()
        target = self.walk(table, keys[:-1], False)
        if keys[-1] in target:
            raise self.error(f"key {keys[-1]!r} is defined twice")
        target[keys[-1]] = value

    # ---- keys --------------------------------------------------------------------------------
    def key(self) -> list[str]:
        keys = []
        while True:
            self.skip_ws()
            c = self.peek()
            if c == '"':
                if self.peek(3) == '"""':
                    raise self.error("a key cannot be a multi-line string")
                keys.append(self.basic_string())
            elif c == "'":
                if self.peek(3) == "'''":
                    raise self.error("a key cannot be a multi-line string")
                keys.append(self.literal_string())
            else:
                m = _BARE.match(self.s, self.i)
                if not m:
                    raise self.error("expected a key")
                keys.append(m.group(0))
                self.i = m.end()
            self.skip_ws()
            if self.peek() != ".":
                return keys
            self.i += 1

    # ---- values ------------------------------------------------------------------------------
    def value(self) -> Any:
        c = self.peek()
        if c == '"':
            return self.ml_basic_string() if self.peek(3) == '"""' else self.basic_string()
        if c == "'":
            return self.ml_literal_string() if self.peek(3) == "'''" else self.literal_string()
        if c == "[":
            return self.array()
        if c == "{":
            return self.inline_table()
        for word, val in (("true", True), ("false", False)):
            if self.s.startswith(word, self.i):
                self.i += len(word)
                return val
        m = _DATETIME.match(self.s, self.i)
        if m:
            return self.datetime(m)
        m = _TIME.match(self.s, self.i)
        if m:
            self.i = m.end()
            return self.checked_time(m.group(1), m.group(2), m.group(3), m.group(4))
        m = _NUMBER.match(self.s, self.i)
        if m:
            self.i = m.end()
            nxt = self.peek()
            if nxt and (nxt.isalnum() or nxt in "._"):
                raise self.error("invalid number")
            return self.number(m.group(0))
        raise self.error("expected a value")

    def number(self, text: str) -> int | float:
        t = text.replace("_", "")
        if t[:2] in ("0x", "0o", "0b"):
            return int(t[2:], {"0x": 16, "0o": 8, "0b": 2}[t[:2]])
        if t.lstrip("+-") in ("inf", "nan"):
            return float(t)
        if any(c in t for c in ".eE"):
            return float(t)
        if len(t.lstrip("+-")) > 1 and t.lstrip("+-").startswith("0"):
            raise self.error("leading zeros are not allowed")
        return int(t)

    def checked_time(self, hh: str, mm: str, ss: str, frac: str | None) -> datetime.time:
        micro = int((frac[1:] + "000000")[:6]) if frac else 0
        try:
            return datetime.time(int(hh), int(mm), int(ss), micro)
        except ValueError:
            raise self.error("invalid time") from None

    def datetime(self, m: re.Match) -> datetime.date | datetime.datetime:
        self.i = m.end()
        try:
            date = datetime.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        except ValueError:
            raise self.error("invalid date") from None
        if m.group(4) is None:
            return date
        t = self.checked_time(m.group(4), m.group(5), m.group(6), m.group(7))
        tz = None
        if m.group(8):
            tz = datetime.timezone.utc
        elif m.group(9):
            sign = 1 if m.group(9) == "+" else -1
            tz = datetime.timezone(sign * datetime.timedelta(hours=int(m.group(10)), minutes=int(m.group(11))))
        return datetime.datetime.combine(date, t, tz)

    def array(self) -> list:
        self.expect("[")
        out: list = []
        while True:
            self.skip_blank()
            if self.peek() == "]":
                self.i += 1
                break
            out.append(self.value())
            self.skip_blank()
            if self.peek() == ",":
                self.i += 1
            elif self.peek() == "]":
                self.i += 1
                break
            else:
                raise self.error("expected ',' or ']' in an array")
        self.frozen.add(id(out))
        return out

    def inline_table(self) -> dict:
        self.expect("{")
        out: dict = {}
        self.skip_ws()
        if self.peek() == "}":
            self.i += 1
        else:
            while True:
                self.key_value(out)
                self.skip_ws()
                if self.peek() == ",":
                    self.i += 1
                elif self.peek() == "}":
                    self.i += 1
                    break
                else:
                    raise self.error("expected ',' or '}' in an inline table")
        self._freeze(out)
        return out

    def _freeze(self, node: Any) -> None:
        if isinstance(node, dict):
            self.frozen.add(id(node))
            for v in node.values():
                self._freeze(v)

    # ---- strings -----------------------------------------------------------------------------
    def _char_ok(self, c: str, multiline: bool) -> bool:
        if c == "\t" or (multiline and c == "\n"):
            return True
        return not (ord(c) < 32 or c == "\x7f")

    def basic_string(self) -> str:
        self.i += 1
        out = []
        while True:
            if self.i >= len(self.s):
                raise self.error("unterminated string")
            c = self.s[self.i]
            if c == '"':
                self.i += 1
                return "".join(out)
            if c == "\\":
                out.append(self.escape())
                continue
            if not self._char_ok(c, False):
                raise self.error("control character in a string")
            out.append(c)
            self.i += 1

    def escape(self) -> str:
        c = self.s[self.i + 1:self.i + 2]
        if c in _ESCAPES:
            self.i += 2
            return _ESCAPES[c]
        if c in ("u", "U"):
            n = 4 if c == "u" else 8
            digits = self.s[self.i + 2:self.i + 2 + n]
            if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.error("invalid unicode escape")
            code = int(digits, 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise self.error("invalid unicode scalar value")
            self.i += 2 + n
            return chr(code)
        raise self.error(f"invalid escape \\{c}")

    def ml_basic_string(self) -> str:
        self.i += 3
        if self.peek() == "\n":
            self.i += 1
        elif self.peek(2) == "\r\n":
            self.i += 2
        out = []
        while True:
            if self.i >= len(self.s):
                raise self.error("unterminated multi-line string")
            if self.s.startswith('"""', self.i):
                quotes = 3
                while self.s.startswith('"', self.i + quotes):
                    quotes += 1
                if quotes > 5:
                    raise self.error("too many quotes after a multi-line string")
                out.append('"' * (quotes - 3))
                self.i += quotes
                return "".join(out)
            c = self.s[self.i]
            if c == "\\":
                m = _LINE_ENDING_BACKSLASH.match(self.s, self.i)
                if m:
                    self.i = m.end()
                    while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
                        self.i += 1
                    continue
                out.append(self.escape())
                continue
            if self.s.startswith("\r\n", self.i):
                out.append("\n")
                self.i += 2
                continue
            if not self._char_ok(c, True):
                raise self.error("control character in a string")
            out.append(c)
            self.i += 1

    def literal_string(self) -> str:
        self.i += 1
        end = self.s.find("'", self.i)
        nl = self.s.find("\n", self.i)
        if end < 0 or (0 <= nl < end):
            raise self.error("unterminated string")
        text = self.s[self.i:end]
        if not all(self._char_ok(c, False) for c in text):
            raise self.error("control character in a string")
        self.i = end + 1
        return text

    def ml_literal_string(self) -> str:
        self.i += 3
        if self.peek() == "\n":
            self.i += 1
        elif self.peek(2) == "\r\n":
            self.i += 2
        end = self.s.find("'''", self.i)
        if end < 0:
            raise self.error("unterminated multi-line string")
        quotes = 3
        while self.s.startswith("'", end + quotes):
            quotes += 1
        if quotes > 5:
            raise self.error("too many quotes after a multi-line string")
        text = self.s[self.i:end + quotes - 3].replace("\r\n", "\n")
        if not all(self._char_ok(c, True) for c in text):
            raise self.error("control character in a string")
        self.i = end + quotes
        return text
