"""``FakeEmbedder``: a deterministic hashing embedder with the real one's contract.

Each lower-cased word and each character trigram of a word is hashed (blake2b, so the same in every
process, unlike ``hash()``) to a dimension and a sign; the row is the normalised sum. Texts that share
words are close, unrelated texts are nearly orthogonal, and the same text always gives the same
float32 row of norm 1. No model, no threads, no I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from infra.errors import DependencyUnavailable

__all__ = ["FakeEmbedder"]

_WORD = re.compile(r"\w+", re.UNICODE)


class FakeEmbedder:
    """Implements ``infra.protocols.Embedder``. ``calls`` records each batch, for assertions."""

    def __init__(self, dimension: int = 384) -> None:
        if dimension < 8:
            raise ValueError("dimension must be at least 8")
        self.dimension = dimension
        self.calls: list[list[str]] = []
        self.unavailable = False  # set True to make embed() raise DependencyUnavailable
        self._closed = False

    async def __aenter__(self) -> FakeEmbedder:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def warmup(self) -> None:
        return None

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not one string")
        if self._closed or self.unavailable:
            raise DependencyUnavailable("FakeEmbedder is closed or marked unavailable")
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = self._vector(text)
        return out

    async def aclose(self) -> None:
        self._closed = True

    def _vector(self, text: str) -> npt.NDArray[np.float32]:
        vector = np.zeros(self.dimension, dtype=np.float64)
        words = _WORD.findall(text.lower())
        for word in words:
            self._add(vector, "w:" + word, 1.0)
            padded = f"#{word}#"
            for i in range(len(padded) - 2):
                self._add(vector, "t:" + padded[i : i + 3], 0.25)
        if not vector.any():  # no words at all: still a unit vector, the same for equal texts
            self._add(vector, "raw:" + text, 1.0)
        vector /= np.linalg.norm(vector)
        return vector.astype(np.float32)

    def _add(self, vector: npt.NDArray[np.float64], feature: str, weight: float) -> None:
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        index = value % self.dimension
        sign = 1.0 if (value >> 63) & 1 else -1.0
        vector[index] += sign * weight
