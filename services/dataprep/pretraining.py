"""Continued pre-training text (--task pt) into trainable rows without dropping any for
its length: run_clm's group_texts (the documents' tokens, each document ending in eos,
joined into one stream and cut into --block_size blocks), or, with --packing, each
document split at max_length into pieces for the packer; and the token accounting the
manifest carries (tokens in = tokens out + tokens dropped, by reason)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Why corpus tokens are not in any row (the manifest's pt.tokens_dropped keys).
TAIL = "tail_shorter_than_block"  # --drop_last_block true: the stream's end, shorter than a block

Piece = tuple[np.ndarray, np.ndarray]  # (input_ids, labels), [n] int32 each


def group_texts(stream: Sequence[int], block_size: int) -> tuple[list[Sequence[int]], Sequence[int]]:
    """run_clm's group_texts on a token stream: its full blocks of `block_size`, in order, and
    the tail shorter than a block (run_clm drops it)."""
    whole = len(stream) // block_size * block_size
    return [stream[i:i + block_size] for i in range(0, whole, block_size)], stream[whole:]


def split(ids: np.ndarray, labels: np.ndarray, max_length: int) -> list[Piece]:
    """A document cut into pieces of `max_length` tokens (the last one shorter), in order."""
    return [(ids[i:i + max_length], labels[i:i + max_length]) for i in range(0, len(ids), max_length)]


class Blocks:
    """group_texts over documents arriving one at a time: a document's tokens join the
    stream and every block that fills is returned at once, so no more than a block plus
    one document is held. `finish` ends the stream: the tail is a last, shorter block
    (drop_last=False) or dropped and counted (reason TAIL)."""

    def __init__(self, block_size: int, drop_last: bool):
        self.block_size, self.drop_last = block_size, drop_last
        self.ids = np.empty(0, dtype=np.int32)  # [< block_size] the stream not yet in a block
        self.labels = np.empty(0, dtype=np.int32)
        self.documents = self.tokens_in = self.tokens_out = self.blocks = 0
        self.dropped: dict[str, int] = {}

    def add(self, ids: np.ndarray, labels: np.ndarray) -> list[Piece]:
        self.documents += 1
        self.tokens_in += len(ids)
        stream = np.concatenate([self.ids, np.asarray(ids, dtype=np.int32)])
        targets = np.concatenate([self.labels, np.asarray(labels, dtype=np.int32)])
        whole = len(stream) // self.block_size * self.block_size
        blocks = [(stream[i:i + self.block_size], targets[i:i + self.block_size])
                  for i in range(0, whole, self.block_size)]
        self.ids, self.labels = stream[whole:], targets[whole:]
        self._out(blocks)
        return blocks

    def finish(self) -> list[Piece]:
        tail = [(self.ids, self.labels)] if len(self.ids) else []
        self.ids = self.labels = np.empty(0, dtype=np.int32)
        if self.drop_last:
            if tail:
                self.dropped[TAIL] = self.dropped.get(TAIL, 0) + len(tail[0][0])
            return []
        self._out(tail)
        return tail

    def _out(self, blocks: list[Piece]) -> None:
        self.blocks += len(blocks)
        self.tokens_out += sum(len(ids) for ids, _ in blocks)

    def manifest(self) -> dict:
        return {"mode": "blocks", "block_size": self.block_size, "drop_last_block": self.drop_last,
                "documents": self.documents, "blocks": self.blocks, "tokens_in": self.tokens_in,
                "tokens_out": self.tokens_out, "tokens_dropped": dict(sorted(self.dropped.items()))}


class Pieces:
    """--packing true: each document split at max_length into pieces the packer places,
    each piece its own sample (position ids restart, attention stays inside it). No token
    is dropped."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.documents = self.tokens_in = self.tokens_out = self.pieces = 0

    def add(self, ids: np.ndarray, labels: np.ndarray) -> list[Piece]:
        pieces = split(np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32), self.max_length)
        self.documents += 1
        self.pieces += len(pieces)
        self.tokens_in += len(ids)
        self.tokens_out += len(ids)
        return pieces

    def finish(self) -> list[Piece]:
        return []

    def manifest(self) -> dict:
        return {"mode": "packing", "max_length": self.max_length, "documents": self.documents,
                "pieces": self.pieces, "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                "tokens_dropped": {}}
