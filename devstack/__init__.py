"""Development-only servers: the local stack without Docker, the dev TGI server, child processes.

Nothing here runs in production: ``echolm worker`` never imports this package. ``echolm up``, the
tests and the benchmarks use it (the ``echolm`` CLI imports it lazily, inside its dev commands).
"""
