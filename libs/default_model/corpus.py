"""The shipped pre-training text: plain paragraphs (corpus/*.txt) and chat dialogues (corpus/dialogues.jsonl)."""

from __future__ import annotations

import json
import pathlib
from typing import Callable

CORPUS_DIR = pathlib.Path(__file__).parent / "corpus"
DIALOGUES = "dialogues.jsonl"
ROLES = ("system", "user", "assistant")


def corpus_files() -> list[pathlib.Path]:
    """Every file of the corpus, in a fixed order (part of the cache fingerprint)."""
    return sorted(p for p in CORPUS_DIR.iterdir() if p.is_file())


def paragraphs() -> list[str]:
    """The paragraphs of every .txt file (separated by blank lines), file by file in name order."""
    found = []
    for path in sorted(CORPUS_DIR.glob("*.txt")):
        found += [block.strip() for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip()]
    return found


def dialogues() -> list[list[dict[str, str]]]:
    """The conversations of dialogues.jsonl, each a list of {"role", "content"} messages."""
    path = CORPUS_DIR / DIALOGUES
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        messages = json.loads(line)["messages"]
        for index, message in enumerate(messages):
            if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                # Shipped data: a bad row is a bug in TuneForge, so fail the build loudly.
                raise ValueError(f"{path}:{number}: messages[{index}]: expected a role in {ROLES} and string content")
        found.append(messages)
    return found


def tokenizer_texts() -> list[str]:
    """What the BPE tokenizer is trained on: the paragraphs and every message as `role\\ncontent`,
    the way the chat template lays it out between the special tokens."""
    texts = paragraphs()
    for messages in dialogues():
        texts += [f"{message['role']}\n{message['content']}" for message in messages]
    return texts


def documents(render_chat: Callable[[list[dict[str, str]]], str], dialogue_repeats: int, end: str) -> list[str]:
    """Pre-training documents: each paragraph, then each dialogue rendered by the chat template
    (`dialogue_repeats` times), every document closed by the `end` token."""
    docs = [text + end for text in paragraphs()]
    chats = [render_chat(messages) + end for messages in dialogues()]
    for _ in range(dialogue_repeats):
        docs += chats
    return docs
