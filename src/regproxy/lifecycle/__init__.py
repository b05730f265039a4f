"""Storage lifecycle: garbage collection, retention rules, cache eviction and checks."""
