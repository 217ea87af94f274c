"""Local tooling, not the library: the servers a single machine runs for `teamtrack up`, the
tests and the benchmark (Mosquitto, Redis, Redis Cluster, Kafka in KRaft mode, PostgreSQL),
their configuration and accounts, and the supervised local cluster with its live scaling.

The services (bridge, dashboard, ingest, rules, gateways) never import this package while they
serve: they share the library (`teamtrack.contract`, `teamtrack.backends`, `teamtrack.history`,
...) and are given their servers' addresses. Only the ingest's own benchmark (`ingest.bench`)
starts a PostgreSQL with it.
"""
