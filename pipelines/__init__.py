"""Thin Ray jobs around the ``linearard`` library: Ray Data, Ray Train (FSDP2), MLflow, entrypoints."""
