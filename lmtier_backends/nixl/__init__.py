"""The ``nixl`` tier: KV chunks moved by NVIDIA NIXL between registered host buffers and storage.

``plugin.py`` registers it cheaply, ``config.py`` holds its options (pydantic only) and
``backend.py`` the tier itself; NIXL is imported only when a tier opens.
"""

__all__: list[str] = []
