"""Self-optimization: the decision store (store, and `python -m production.tune show|clear`), training-runtime
decisions (training), the cache-policy guard, sensitivities and search (guard, sensitivity, policy, auto) and
the decode plan (decode)."""
