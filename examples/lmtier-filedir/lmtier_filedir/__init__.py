"""Example third-party lmtier backend built on :mod:`lmtier.kit`."""
