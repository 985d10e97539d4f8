"""Keep constrained JSON output valid while it streams.

The grammar engine (xgrammar 0.2.8) lets raw control characters (U+0000-U+001F) through inside
JSON strings, which strict JSON parsers (Python's ``json``, JavaScript's ``JSON.parse``) reject.
:class:`ControlCharEscaper` rewrites them as ``\\u00XX`` escapes, chunk by chunk, tracking whether
the text is inside a string across chunk boundaries. The decoded value is unchanged (one
character either way), so the output still satisfies the schema's string lengths.
"""

from __future__ import annotations


class ControlCharEscaper:
    __slots__ = ("in_string", "escaped")

    def __init__(self) -> None:
        self.in_string = False
        self.escaped = False

    def feed(self, text: str) -> str:
        if not text:
            return text
        out: list[str] = []
        for ch in text:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                elif ch < " ":
                    out.append(f"\\u{ord(ch):04x}")
                    continue
            elif ch == '"':
                self.in_string = True
            out.append(ch)
        return "".join(out)
