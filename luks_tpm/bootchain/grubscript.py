"""GRUB 2.06's script language: lexer and parser, enough for what Debian's grub-mkconfig writes.

Words keep their quoting (it decides field splitting and empty arguments when GRUB expands them);
`menuentry`/`submenu` blocks keep their raw source text, because GRUB measures and later executes that
text, not a re-serialisation. Constructs outside this model (`for`, `while`, `until`, `case`, unbalanced
quotes or braces) raise Unpredictable(UNMODELLED_CONFIG): never a guess.
"""

from __future__ import annotations

import dataclasses
import enum

from .errors import Reason, Unpredictable


class PartKind(enum.Enum):
    LITERAL = "literal"  # unquoted text
    QUOTED = "quoted"  # text inside '...' or "..."
    VARIABLE = "variable"  # unquoted $name: split into fields on expansion
    QUOTED_VARIABLE = "quoted-variable"  # "$name": one field, kept even when empty


@dataclasses.dataclass(frozen=True)
class Part:
    kind: PartKind
    text: str  # the literal text, or the variable's name


Word = tuple[Part, ...]


@dataclasses.dataclass(frozen=True)
class Command:
    words: tuple[Word, ...]


@dataclasses.dataclass(frozen=True)
class If:
    branches: tuple[tuple[tuple[Node, ...], tuple[Node, ...]], ...]  # (condition, body) for if and each elif
    otherwise: tuple[Node, ...]


@dataclasses.dataclass(frozen=True)
class Function:
    name: str
    body: tuple[Node, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
    """A `menuentry` or `submenu`: its arguments and the raw text between its braces."""

    keyword: str
    words: tuple[Word, ...]
    source: str


Node = Command | If | Function | Entry

_KEYWORDS = {"if", "then", "elif", "else", "fi", "function", "menuentry", "submenu", "{", "}"}
_UNMODELLED = {"for", "while", "until", "case", "do", "done", "in", "esac", "select", "[[", "]]"}
_SPECIAL_VARIABLES = "?#*@"


def unmodelled(detail: str) -> Unpredictable:
    return Unpredictable(Reason.UNMODELLED_CONFIG, detail)


@dataclasses.dataclass
class _Token:
    word: Word | None  # None for a separator (newline or ';')
    start: int
    end: int

    def keyword(self) -> str | None:
        if self.word and len(self.word) == 1 and self.word[0].kind is PartKind.LITERAL:
            return self.word[0].text
        return None


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def _variable(self, quoted: bool) -> Part:
        text, pos = self.text, self.pos + 1
        kind = PartKind.QUOTED_VARIABLE if quoted else PartKind.VARIABLE
        if pos < len(text) and text[pos] == "{":
            close = text.find("}", pos)
            if close < 0:
                raise unmodelled("unterminated ${ in grub.cfg")
            self.pos = close + 1
            return Part(kind, text[pos + 1 : close])
        end = pos
        if end < len(text) and text[end] in _SPECIAL_VARIABLES:
            end += 1
        else:
            while end < len(text) and (text[end].isalnum() or text[end] == "_"):
                end += 1
        if end == pos:
            self.pos = pos
            return Part(PartKind.QUOTED if quoted else PartKind.LITERAL, "$")
        self.pos = end
        return Part(kind, text[pos:end])

    def _double_quoted(self, parts: list[Part]) -> None:
        text = self.text
        self.pos += 1
        buffer = ""
        while True:
            if self.pos >= len(text):
                raise unmodelled('unterminated " in grub.cfg')
            char = text[self.pos]
            if char == '"':
                self.pos += 1
                break
            if char == "\\" and self.pos + 1 < len(text) and text[self.pos + 1] in '$"\\\n':
                buffer += "" if text[self.pos + 1] == "\n" else text[self.pos + 1]
                self.pos += 2
            elif char == "$":
                parts.append(Part(PartKind.QUOTED, buffer))
                buffer = ""
                parts.append(self._variable(quoted=True))
            else:
                buffer += char
                self.pos += 1
        parts.append(Part(PartKind.QUOTED, buffer))

    def _word(self) -> Word:
        text, parts = self.text, []
        while self.pos < len(text) and text[self.pos] not in " \t\r\n;":
            char = text[self.pos]
            if char == "'":
                close = text.find("'", self.pos + 1)
                if close < 0:
                    raise unmodelled("unterminated ' in grub.cfg")
                parts.append(Part(PartKind.QUOTED, text[self.pos + 1 : close]))
                self.pos = close + 1
            elif char == '"':
                self._double_quoted(parts)
            elif char == "\\" and self.pos + 1 < len(text):
                if text[self.pos + 1] != "\n":
                    parts.append(Part(PartKind.QUOTED, text[self.pos + 1]))
                self.pos += 2
            elif char == "$":
                parts.append(self._variable(quoted=False))
            elif char in "|&":
                raise unmodelled(f"shell operator {char!r} in grub.cfg")
            else:
                parts.append(Part(PartKind.LITERAL, char))
                self.pos += 1
        return _merge(parts)

    def tokens(self) -> list[_Token]:
        text, tokens = self.text, []
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t\r":
                self.pos += 1
            elif char in "\n;":
                tokens.append(_Token(None, self.pos, self.pos + 1))
                self.pos += 1
            elif char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                start = self.pos
                tokens.append(_Token(self._word(), start, self.pos))
        return tokens


def _merge(parts: list[Part]) -> Word:
    """Adjacent literal characters as one part (quoted empty parts are kept: they make an argument)."""
    merged: list[Part] = []
    for part in parts:
        if merged and part.kind is PartKind.LITERAL and merged[-1].kind is PartKind.LITERAL:
            merged[-1] = Part(PartKind.LITERAL, merged[-1].text + part.text)
        else:
            merged.append(part)
    return tuple(merged)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _Lexer(text).tokens()
        self.pos = 0

    def _peek_keyword(self) -> str | None:
        self._skip_separators()
        return self.tokens[self.pos].keyword() if self.pos < len(self.tokens) else None

    def _skip_separators(self) -> None:
        while self.pos < len(self.tokens) and self.tokens[self.pos].word is None:
            self.pos += 1

    def _expect(self, keyword: str) -> _Token:
        if self._peek_keyword() != keyword:
            raise unmodelled(f"expected {keyword!r} in grub.cfg")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def block(self, until: frozenset[str]) -> tuple[Node, ...]:
        nodes: list[Node] = []
        while True:
            keyword = self._peek_keyword()
            if self.pos >= len(self.tokens):
                if until:
                    raise unmodelled(f"grub.cfg ends before {'/'.join(sorted(until))}")
                return tuple(nodes)
            if keyword in until:
                return tuple(nodes)
            nodes.append(self._statement(keyword))

    def _statement(self, keyword: str | None) -> Node:
        if keyword == "if":
            return self._if()
        if keyword == "function":
            self.pos += 1
            name = self.tokens[self.pos].keyword() if self.pos < len(self.tokens) else None
            if not name:
                raise unmodelled("function without a name in grub.cfg")
            self.pos += 1
            self._expect("{")
            body = self.block(frozenset({"}"}))
            self._expect("}")
            return Function(name, body)
        if keyword in ("menuentry", "submenu"):
            return self._entry(keyword)
        if keyword in _UNMODELLED or keyword in _KEYWORDS:
            raise unmodelled(f"{keyword!r} in grub.cfg")
        return self._command()

    def _command(self) -> Command:
        words = []
        while self.pos < len(self.tokens) and (word := self.tokens[self.pos].word) is not None:
            words.append(word)
            self.pos += 1
        return Command(tuple(words))

    def _if(self) -> If:
        branches = []
        keyword = "if"
        while keyword in ("if", "elif"):
            self.pos += 1
            condition = self.block(frozenset({"then"}))
            self._expect("then")
            body = self.block(frozenset({"elif", "else", "fi"}))
            branches.append((condition, body))
            keyword = self._peek_keyword() or ""
        otherwise: tuple[Node, ...] = ()
        if keyword == "else":
            self.pos += 1
            otherwise = self.block(frozenset({"fi"}))
        self._expect("fi")
        return If(tuple(branches), otherwise)

    def _entry(self, keyword: str) -> Entry:
        self.pos += 1
        words = []
        while self.pos < len(self.tokens) and self.tokens[self.pos].keyword() != "{":
            token = self.tokens[self.pos]
            if token.word is None:
                raise unmodelled(f"{keyword} without a {{ block in grub.cfg")
            words.append(token.word)
            self.pos += 1
        if self.pos >= len(self.tokens):
            raise unmodelled(f"{keyword} without a {{ block in grub.cfg")
        start = self.tokens[self.pos].end
        self.pos += 1
        self.block(frozenset({"}"}))  # parsed only to find the matching brace; executed from source later
        close = self._expect("}")
        return Entry(keyword, tuple(words), self.text[start : close.start])


def parse(text: str) -> tuple[Node, ...]:
    """The statements of a GRUB script."""
    parser = _Parser(text)
    nodes = parser.block(frozenset())
    return nodes
