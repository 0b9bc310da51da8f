"""Admission policies that limit who may call and how much: rate limits, token and spend
budgets and concurrent streams, held exactly across replicas by leasing slices of shared
counters (docs/LIMITS.md); blocks; the abuse detector."""
