"""Self-optimization: the decision store (store, and `python -m production.tune show|clear`), training-runtime
decisions (training), the cache-policy search (policy, auto) and the decode plan (decode)."""
