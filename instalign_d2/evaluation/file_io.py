"""Atomic JSON files for the evaluator: a reader never sees a half-written result or dump."""

from instalign_d2.utils.atomic_io import atomic_write_json  # noqa: F401
