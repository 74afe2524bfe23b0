"""Multi-turn conversations: what retrieval keys on, and what an admitted example holds.

The problem (GPTCache#8): keyed on the last user turn alone, "What about its population?" asked
after "Tell me about Paris" and after "Tell me about Tokyo" are the same text, so the second
conversation retrieves (and a plain semantic cache would serve) the first one's answer. A follow-up
means little without the turns before it.

The decision (docs/decisions.md, "Conversation keys", with the MiniLM measurement):

* **The key** is the last user turn, then a compact context: the client's system turn and the
  previous user turns, most recent first, each cut to ``TURN_CHARS`` and all of it to
  ``CONTEXT_CHARS``::

      What about its population?
      (Earlier in this conversation: Tell me about Paris. | System: Answer briefly.)

  The question comes first so that an embedder which truncates long inputs keeps it. Assistant
  turns are left out: they are long, mostly restate the user's topic, and are whatever the client
  says they were. A single user turn with no system turn keys on its text exactly, as a v1 prompt
  does, so v1 and v2 requests share one bank.
* **An admitted example** holds that key as its request and the reply as its response: a
  standalone question-and-answer that still makes sense as an earlier turn of some other
  conversation, embedded as exactly the text later lookups compare against.
* **Examples go in before the conversation**: our system turn (with a note saying how many of the
  first exchanges are examples), the example pairs, then the conversation's own turns, so the real
  exchange stays contiguous and last (``agents.policy.prompt.build_messages``).

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence

from infra.protocols import ChatMessage

__all__ = [
    "CONTEXT_CHARS",
    "CONTEXT_LABEL",
    "TURN_CHARS",
    "client_system_text",
    "conversation_turns",
    "is_single_turn",
    "last_user_turn",
    "retrieval_key",
]

TURN_CHARS = 160  # each earlier turn in the key is cut to this many characters
CONTEXT_CHARS = 400  # the whole context part of the key is cut to this many characters
CONTEXT_TURNS = 3  # earlier user turns that can enter the key
CONTEXT_LABEL = "Earlier in this conversation:"


def _compact(text: str, limit: int) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ", limit * 2 // 3)
    return (cut[:space] if space > 0 else cut).rstrip() + "…"


def last_user_turn(messages: Sequence[ChatMessage]) -> str:
    """The content of the last user turn (the question being asked). Raises ``ValueError`` if none."""
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    raise ValueError("a conversation needs at least one user turn")


def client_system_text(messages: Sequence[ChatMessage]) -> str:
    """The client's system turns joined (empty when there are none)."""
    return "\n\n".join(m.content for m in messages if m.role == "system" and m.content.strip())


def conversation_turns(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The user and assistant turns, in order (system turns are merged into ours elsewhere)."""
    return [m for m in messages if m.role != "system"]


def is_single_turn(messages: Sequence[ChatMessage]) -> bool:
    """One user turn and nothing else that could change its meaning (no system, no earlier turns)."""
    return len(messages) == 1 and messages[0].role == "user"


def retrieval_key(messages: Sequence[ChatMessage]) -> str:
    """The text a conversation is embedded and admitted as (see the module docstring)."""
    question = last_user_turn(messages)
    if is_single_turn(messages):
        return question
    last = max(i for i, m in enumerate(messages) if m.role == "user")
    earlier = [m.content for m in messages[:last] if m.role == "user" and m.content.strip()]
    parts = [_compact(text, TURN_CHARS) for text in reversed(earlier[-CONTEXT_TURNS:])]
    system = client_system_text(messages)
    if system:
        parts.append("System: " + _compact(system, TURN_CHARS))
    if not parts:  # only assistant turns before the question: nothing a key can use
        return question
    context = _compact(" | ".join(parts), CONTEXT_CHARS)
    return f"{question.rstrip()}\n({CONTEXT_LABEL} {context})"
