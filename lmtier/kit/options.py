"""Options that several backends' configs share, declared once (pydantic only: a backend's
``config.py`` imports this, and nothing heavy comes with it)."""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = ["DEFAULT_FAN_OUT", "MAX_FAN_OUT", "FileLayoutOptions"]

#: directory levels of :class:`~lmtier.kit.FileLayout` below ``<root>/<namespace>/`` by default
DEFAULT_FAN_OUT = 2
#: the most levels a layout takes (4 levels of 2 hex digits: 2^32 directories)
MAX_FAN_OUT = 4


class FileLayoutOptions(BaseModel):
    """The options of a tier whose files follow :class:`~lmtier.kit.FileLayout` (the ``disk`` tier,
    NIXL's ``posix`` plugin): subclass it in the tier's config and pass ``fan_out`` to the layout.

    Attributes:
        fan_out: directory levels between ``root/<namespace>/`` and the files, each named by two
            hex characters of the key digest (2 levels = up to 65,536 directories), so no
            directory grows huge. Changing it later is fine: files found at another depth are
            moved to the new place when the tier opens.
    """

    fan_out: int = Field(DEFAULT_FAN_OUT, ge=0, le=MAX_FAN_OUT,
                         description="directory levels of 2 hex chars each below the namespace")
