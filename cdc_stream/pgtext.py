"""Parse the text forms PostgreSQL's output functions write (pure, no I/O).

The parsers accept what `array_out` and `record_out` produce, which is
stricter than what their input functions accept. `array_out` double-quotes
an element when it is empty, is `NULL` in any case, or contains the
delimiter, a brace, a quote, a backslash or white space, and escapes `"` and
`\\` with a backslash. An unquoted `NULL` is SQL NULL. `record_out`
double-quotes a field when it is empty or contains a parenthesis, a comma, a
quote, a backslash or white space, and doubles `"` and `\\`. An empty field
is SQL NULL. Text in any other form raises ValueError.
"""

from __future__ import annotations

import functools
import re

ArrayItem = str | None | list["ArrayItem"]

_BACKSLASH_ESCAPE_RE = re.compile(r"\\(.)", re.S)
_RECORD_ESCAPE_RE = re.compile(r'""|\\(.)', re.S)
_RECORD_FIELD_RE = re.compile(r'"((?:[^"\\]|""|\\.)*)"|([^,()"\\]*)', re.S)


@functools.cache
def _array_token_re(delimiter: str) -> re.Pattern[str]:
    d = re.escape(delimiter)
    return re.compile(
        rf'"((?:[^"\\]|\\.)*)"|([^{d}{{}}"\\]+)|([{{}}]|{d})',
        re.S,
    )


def parse_array(text: str, delimiter: str = ",") -> list[ArrayItem]:
    """Parse an array's text form into nested lists of element texts and None.

    Lower bounds (`[0:1]={7,8}`) are dropped, as `to_jsonb` drops them.
    """
    start = 0
    if text.startswith("["):
        start = text.index("=") + 1
    tokens = _array_token_re(delimiter)

    root: list[ArrayItem] | None = None
    stack: list[list[ArrayItem]] = []
    current: list[ArrayItem] | None = None
    position = start
    for match in tokens.finditer(text, start):
        if match.start() != position or (current is None and match[3] != "{"):
            raise ValueError("malformed array text")
        position = match.end()

        quoted, bare, punctuation = match.groups()
        if punctuation == "{":
            level: list[ArrayItem] = []
            if current is None:
                root = level
            else:
                current.append(level)
                stack.append(current)
            current = level
        elif punctuation == "}":
            current = stack.pop() if stack else None
        elif punctuation is not None:
            continue
        elif quoted is not None:
            assert current is not None
            current.append(_unescape_array(quoted))
        else:
            assert current is not None
            current.append(None if bare == "NULL" else bare)

    if root is None or current is not None or position != len(text):
        raise ValueError("malformed array text")
    return root


def _unescape_array(text: str) -> str:
    if "\\" not in text:
        return text
    return _BACKSLASH_ESCAPE_RE.sub(r"\1", text)


def parse_record(text: str) -> list[str | None]:
    """Parse a composite value's text form into field texts and None.

    `()` is one NULL field; the caller knows when a type has no fields.
    """
    if len(text) < 2 or text[0] != "(" or text[-1] != ")":
        raise ValueError("malformed record text")

    fields: list[str | None] = []
    end = len(text) - 1
    position = 1
    while True:
        match = _RECORD_FIELD_RE.match(text, position, end)
        assert match is not None
        quoted, bare = match.groups()
        if quoted is not None:
            fields.append(_unescape_record(quoted))
        else:
            fields.append(bare or None)

        position = match.end()
        if position == end:
            return fields
        if text[position] != ",":
            raise ValueError("malformed record text")
        position += 1


def _unescape_record(text: str) -> str:
    if '"' not in text and "\\" not in text:
        return text
    return _RECORD_ESCAPE_RE.sub(lambda m: '"' if m[1] is None else m[1], text)


def split_vector(text: str) -> list[str]:
    """Split the text of an int2vector or oidvector (`1 2 3`) into elements."""
    return text.split()


def timestamp_to_iso(text: str) -> str:
    """Convert timestamp text in DateStyle ISO to the form `to_jsonb` writes.

    `2024-06-01 12:00:00.5` becomes `2024-06-01T12:00:00.5`; `infinity`,
    `-infinity` and the ` BC` suffix stay as they are.
    """
    if text[10:11] == " ":
        return text[:10] + "T" + text[11:]
    space = text.find(" ")
    if space < 0:
        return text
    return text[:space] + "T" + text[space + 1 :]


def timestamptz_to_iso(text: str) -> str:
    """Convert timestamptz text in DateStyle ISO to the form `to_jsonb` writes.

    The date and time are joined by `T` and the offset gets its minutes:
    `2024-06-01 12:00:00+00` becomes `2024-06-01T12:00:00+00:00`.
    """
    if text[-3:] == "+00" and text[10:11] == " ":
        return text[:10] + "T" + text[11:] + ":00"
    space = text.find(" ")
    if space < 0:
        return text
    date, rest = text[:space], text[space + 1 :]

    era = ""
    if rest.endswith(" BC"):
        rest, era = rest[:-3], " BC"
    sign = max(rest.rfind("+"), rest.rfind("-"))
    if sign > 0 and ":" not in rest[sign:]:
        rest += ":00"
    return f"{date}T{rest}{era}"
