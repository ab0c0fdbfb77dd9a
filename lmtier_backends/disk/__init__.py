"""The ``disk`` tier: one file per chunk under a local directory, persistent across restarts."""

__all__: list[str] = []
