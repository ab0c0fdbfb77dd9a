"""Registers the ``dictstore`` backend."""

from pydantic import BaseModel

from lmtier import BackendSpec, hookimpl


class DictStoreConfig(BaseModel):
    """No options."""


@hookimpl
def lmtier_backend_specs():
    return [BackendSpec(name="dictstore", factory="lmtier_dictstore.backend:DictStore",
                        config="lmtier_dictstore.plugin:DictStoreConfig", install_hint="pip install lmtier-dictstore")]
