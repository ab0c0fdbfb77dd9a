"""lmtier's built-in storage backends, each registered through the ``lmtier`` entry point.

Each subpackage follows the same three-module shape a third-party backend uses:
``plugin.py`` (cheap: the hook returning a BackendSpec), ``config.py`` (pydantic only) and
``backend.py`` (the heavy imports, loaded only when a tier uses the backend).
"""

__all__: list[str] = []
