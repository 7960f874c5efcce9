"""FSDP2 / DTensor support (issue #4): owner-based matrix transforms and shard-aware reductions.

Placeholder until the owner-based implementation lands: DTensor matrices are gathered on every rank.
"""
