"""echolm: a Kafka-native in-context cache and load-aware router for LLM serving.

Public API: ``EchoClient`` and ``Reply`` (``from echolm import EchoClient``). Imported lazily so
``import echolm`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EchoClient", "Reply"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import client

        return getattr(client, name)
    raise AttributeError(name)
