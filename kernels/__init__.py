"""Linear-memory relation-KL op (imported as ``linearard.kernels``)."""
