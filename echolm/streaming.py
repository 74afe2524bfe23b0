"""``StreamAssembler``: a streaming request's chunk records -> the text a reader may show.

Pure (no Kafka, no clock), so the rule is unit-tested on any interleaving.

The rule (docs/reliability.md, "Streaming"): a reader never shows the same text twice and never
takes text back.

* Chunks are grouped by ``attempt`` (one generation attempt: a retry on another backend, or a
  request re-processed after a crash, has a new one) and applied in ``seq`` order per attempt; a
  duplicate ``seq`` is dropped, a gap waits for the missing chunk.
* The newest attempt (the last one to appear) is the one followed; chunks of an attempt that was
  overtaken are dropped.
* Of the newest attempt's text, only what extends the text already shown is handed out: while the
  retry repeats what was shown (greedy decoding on the same model does) nothing is handed out, then
  the rest is. An attempt that disagrees with what was shown is followed no further.
* The final reply holds the whole text: its part beyond what was shown is handed out last. If what
  was shown is not its prefix (the retry diverged), ``final`` raises ``StreamDiverged`` and the
  reader reports an error instead of a mixed text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infra.errors import StreamDiverged

__all__ = ["StreamAssembler"]


@dataclass
class _Attempt:
    text: str = ""
    next_seq: int = 0
    waiting: dict[int, str] = field(default_factory=dict)  # out-of-order chunks, by seq


@dataclass
class StreamAssembler:
    max_waiting: int = 4096  # chunks buffered behind a gap, per attempt; past it the gap is given up
    shown: str = ""
    diverged: bool = False
    dropped: int = 0  # chunks of overtaken attempts, and duplicates
    _attempts: dict[str, _Attempt] = field(default_factory=dict)
    _current: str | None = None

    def chunk(self, attempt: str, seq: int, text: str) -> str:
        """Take one chunk record; returns the text to show now ("" when none)."""
        state = self._attempts.get(attempt)
        if state is None:
            state = self._attempts[attempt] = _Attempt()
            self._current = attempt
        elif attempt != self._current:
            self.dropped += 1
            return ""
        if seq < state.next_seq or seq in state.waiting:
            self.dropped += 1
            return ""
        state.waiting[seq] = text
        while state.next_seq in state.waiting:
            state.text += state.waiting.pop(state.next_seq)
            state.next_seq += 1
        if len(state.waiting) > self.max_waiting:  # a chunk was lost for good: the final reply fills in
            self.diverged = True
        return self._extend(state.text)

    def final(self, text: str) -> str:
        """The final reply's whole text; returns its part not shown yet."""
        if not text.startswith(self.shown):
            raise StreamDiverged(
                f"a retried generation disagrees with the {len(self.shown)} characters already streamed; "
                "ask again"
            )
        rest = text[len(self.shown) :]
        self.shown = text
        return rest

    def _extend(self, text: str) -> str:
        if self.diverged:
            return ""
        if text.startswith(self.shown):
            rest = text[len(self.shown) :]
            self.shown = text
            return rest
        if not self.shown.startswith(text):
            self.diverged = True
        return ""
