"""How well retrieval keys separate multi-turn conversations (docs/decisions.md, "Conversation keys").

For each case, two conversations end in the *same* follow-up after *unrelated* first turns (a key
that matches them serves one conversation's answer to the other: GPTCache#8), and a third is a
reworded twin of the first (a key should still match it). MiniLM cosine of the keys, for the
last-user-turn key and for ``streams.conversation.retrieval_key``.

    python -m bench.conversation_keys
"""

from __future__ import annotations

import statistics

import numpy as np

from infra.protocols import ChatMessage
from streams.conversation import retrieval_key

# (first turn A, first turn B unrelated, reworded A, follow-up, reworded follow-up)
CASES = [
    (
        "Tell me about Paris.",
        "Tell me about Tokyo.",
        "What can you tell me about Paris, France?",
        "What about its population?",
        "How many people live there?",
    ),
    (
        "How do I install numpy?",
        "How do I install Docker on Ubuntu?",
        "What's the way to install the numpy package?",
        "And how do I upgrade it?",
        "How can I update it later?",
    ),
    (
        "Explain recursion in programming.",
        "Explain photosynthesis.",
        "What is recursion in computer programs?",
        "Can you give an example?",
        "Show me an example please.",
    ),
    (
        "Who wrote Pride and Prejudice?",
        "Who painted the Mona Lisa?",
        "Which author wrote Pride and Prejudice?",
        "When was that?",
        "What year was it?",
    ),
    (
        "What is the boiling point of water?",
        "What is the speed of light?",
        "At what temperature does water boil?",
        "Why?",
        "Why is that so?",
    ),
    (
        "My Python script raises a KeyError.",
        "My car makes a grinding noise when braking.",
        "I get a KeyError in my Python code.",
        "How do I fix it?",
        "What should I do to fix this?",
    ),
    (
        "Translate 'good morning' into Spanish.",
        "Translate 'good morning' into Japanese.",
        "How do you say 'good morning' in Spanish?",
        "And 'good night'?",
        "What about 'good night'?",
    ),
    (
        "Summarise the plot of Hamlet.",
        "Summarise the causes of World War I.",
        "Give me a summary of Hamlet's story.",
        "Make it shorter.",
        "Can you shorten that?",
    ),
]


def _conv(first: str, follow_up: str) -> list[ChatMessage]:
    return [
        ChatMessage(role="user", content=first),
        ChatMessage(role="assistant", content="(an answer)"),
        ChatMessage(role="user", content=follow_up),
    ]


def main() -> None:
    from sentence_transformers import SentenceTransformer

    from infra.embedding import default_model_path

    model = SentenceTransformer(str(default_model_path()), device="cpu")

    def cos(a: str, b: str) -> float:
        v = model.encode([a, b], normalize_embeddings=True)
        return float(np.dot(v[0], v[1]))

    rows: dict[str, list[float]] = {
        k: [] for k in ("last_unrelated", "last_twin", "key_unrelated", "key_twin")
    }
    for a, b, a2, follow, follow2 in CASES:
        conv_a, conv_b, conv_a2 = _conv(a, follow), _conv(b, follow), _conv(a2, follow2)
        rows["last_unrelated"].append(cos(follow, follow))
        rows["last_twin"].append(cos(follow, follow2))
        rows["key_unrelated"].append(cos(retrieval_key(conv_a), retrieval_key(conv_b)))
        rows["key_twin"].append(cos(retrieval_key(conv_a), retrieval_key(conv_a2)))
    print(f"n = {len(CASES)} cases; MiniLM (all-MiniLM-L6-v2) cosine of keys")
    print("| key | same follow-up, unrelated conversation | reworded twin conversation | margin |")
    print("| --- | --- | --- | --- |")
    for name, label in (("last", "last user turn"), ("key", "retrieval_key")):
        u, t = rows[f"{name}_unrelated"], rows[f"{name}_twin"]
        print(
            f"| {label} | {statistics.mean(u):.3f} (min {min(u):.3f}, max {max(u):.3f}) "
            f"| {statistics.mean(t):.3f} (min {min(t):.3f}, max {max(t):.3f}) "
            f"| {statistics.mean(t) - statistics.mean(u):+.3f} |"
        )
    wins = sum(t > u for t, u in zip(rows["key_twin"], rows["key_unrelated"], strict=True))
    print(f"retrieval_key ranks the twin above the unrelated conversation in {wins}/{len(CASES)} cases")
    wins_last = sum(t > u for t, u in zip(rows["last_twin"], rows["last_unrelated"], strict=True))
    print(f"last user turn ranks the twin above the unrelated conversation in {wins_last}/{len(CASES)} cases")


if __name__ == "__main__":
    main()
