"""Where the trained spans of a conversation fall, found once per conversation
shape instead of once per row.

Locating the assistant turns renders every prefix of the conversation (see
template.trained_spans): four or five renders of a two-round row, where
tokenizing it takes one. Rows of the same shape (the same roles, trained turns
and loss_scale) render alike but for their contents, so the spans are found
once on a skeleton, the conversation with each content replaced by a marker
("\\ue000<i>\\ue001", private-use characters), and mapped to each row by
putting its contents in place of the markers.

A row takes this path only when that is provably what the slow path gives:
  - its own rendering (made anyway, to be tokenized) equals the skeleton's with
    its contents put in, character for character; a template that does more with
    a content than print it (trims it, tests it, cuts it) renders otherwise and
    the row takes the slow path;
  - the skeleton's spans were found from prefixes alone (no template that closes
    a last turn differently from earlier ones, the `default` template's case);
  - no span edge touches a content that is empty or starts or ends with
    whitespace (a turn's end is found by stripping trailing whitespace, which
    would run into such a content).
"""

from __future__ import annotations

import dataclasses
import re
import weakref

OPEN, CLOSE = "\ue000", "\ue001"
_MARKER = re.compile(f"{OPEN}([0-9]+){CLOSE}")
MAX_SHAPES = 4096  # layouts kept per tokenizer; rows of further shapes take the slow path


def marker(index: int) -> str:
    return f"{OPEN}{index}{CLOSE}"


@dataclasses.dataclass(frozen=True)
class Layout:
    """A skeleton rendering: literals[0], slot 0's content, literals[1], ...,
    literals[-1], where slots[j] is the index of the message whose content goes
    in slot j; each span edge as (literal index, offset in it); `guards`: the
    messages whose content an edge touches."""

    literals: tuple[str, ...]
    slots: tuple[int, ...]
    edges: tuple[tuple[tuple[int, int], tuple[int, int]], ...]
    guards: tuple[int, ...]

    def spans(self, contents: list[str], text: str) -> list[tuple[int, int]] | None:
        """The spans in `text` (the row's rendering, whose contents these are), or
        None when the row does not fit this layout."""
        for index in self.guards:
            content = contents[index]
            if not content or content[0].isspace() or content[-1].isspace():
                return None
        parts, starts, position = [self.literals[0]], [0], 0
        for slot, literal in zip(self.slots, self.literals[1:]):
            content = contents[slot]
            position += len(parts[-1]) + len(content)
            parts += (content, literal)
            starts.append(position)
        if "".join(parts) != text:
            return None
        return [(starts[a] + da, starts[b] + db) for (a, da), (b, db) in self.edges]


def build(skeleton: str, spans: list[tuple[int, int]]) -> Layout | None:
    """The layout of a skeleton rendering and its spans; None when a span edge falls
    inside a marker or the template altered a marker."""
    pieces = _MARKER.split(skeleton)
    literals, slots = tuple(pieces[0::2]), tuple(int(index) for index in pieces[1::2])
    if any(OPEN in literal or CLOSE in literal for literal in literals):
        return None  # a marker cut or rewritten by the template
    bounds, position = [], 0  # each literal's [start, end] in the skeleton
    for i, literal in enumerate(literals):
        bounds.append((position, position + len(literal)))
        if i < len(slots):
            position += len(literal) + len(marker(slots[i]))
    edges, guards = [], set()

    def locate(at: int) -> tuple[int, int] | None:
        for i, (start, end) in enumerate(bounds):
            if start <= at <= end:
                if at == start and i > 0:
                    guards.add(slots[i - 1])
                if at == end and i < len(slots):
                    guards.add(slots[i])
                return i, at - start
        return None

    for start, end in spans:
        a, b = locate(start), locate(end)
        if a is None or b is None:
            return None
        edges.append((a, b))
    return Layout(literals, slots, tuple(edges), tuple(sorted(guards)))


class Cache:
    """Layouts by shape, per tokenizer (None for a shape that has none)."""

    def __init__(self) -> None:
        self._by_tokenizer: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, tokenizer, shape: tuple, make) -> Layout | None:
        layouts = self._by_tokenizer.setdefault(tokenizer, {})
        if shape not in layouts:
            if len(layouts) >= MAX_SHAPES:
                return None
            layouts[shape] = make()
        return layouts[shape]
