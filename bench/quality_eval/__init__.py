"""Measured quality of echolm's serving conditions on a real model pair and real references.

See docs/evaluation.md ("Measured quality") and docs/quality-preregistration.md. Modules:
``data`` (ShareGPT bank/live split, manifest of ids and hashes), ``prepare`` (building it, local
text and vector cache), ``facts`` (the invented-fact sets and their checker), ``conditions`` (the
prompt of every serving condition), ``engine`` (llama-cpp-python on the two GGUFs), ``cache`` (the
generation cache), ``run`` (resumable generation in pieces), ``metrics`` (MiniLM cosine, ROUGE-L,
chrF), ``judge`` (pairwise judge), ``stats`` (win rates, bootstrap, Holm), ``report`` (tables,
BENCHMARKS.md section, ``bench/results/quality-cells.json``).
"""

__all__: list[str] = []
