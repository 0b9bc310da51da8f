"""Admission policies that limit who may call and how much: limits, leases, blocks, the abuse detector."""
