"""The value-codec contract: what a codec is, what it may know about the KV, how it is found.

A **value codec** turns a chunk's bytes into fewer bytes for one tier (``codec:`` in the tier's
YAML) and back. The manager applies it on worker threads as values go into and come out of that
tier; the stored value's header (:mod:`lmtier.framing`) records the codec id and the raw length,
so a reader knows how to decode whatever a tier returns, whatever its own configuration says.

Two kinds:

* **lossless** (``lossy = False``): ``decode(encode(x)) == x`` byte for byte. Any value may be
  encoded; the codec needs nothing but the bytes.
* **lossy** (``lossy = True``): KV quantization. It needs to know what the bytes are
  (:class:`KVGeometry`: dtype, layers, pages, heads, head size, page layout), which it learns
  from the :class:`~lmtier.keys.KVNamespace` the engine registers. Lossy KV is different KV: the
  codec's :meth:`ValueCodec.tag` enters the namespace of every engine whose chain has a lossy
  tier, so lossy values are only ever served to engines configured for them
  (``docs/codecs.md``, "Lossy codecs and namespaces").

Codecs are registered like backends: a plugin's ``lmtier_value_codecs()`` hook returns
:class:`CodecSpec` objects (see :mod:`lmtier.hookspecs`); lmtier's own four come from
:mod:`lmtier.codecs.plugin` through the same entry-point group.

**Codec ids** (16 bits, in the header): ``0`` means no codec. ``1..0x7FFF`` are lmtier's own and
are assigned in :data:`lmtier.framing.LMTIER_CODEC_IDS`; a value carrying an id of that range this
build does not know is a newer writer's (a miss left in place, at the backend). ``0x8000..0xFFFF``
are for third-party codecs: pick one at random in that range and never reuse it for another
format. A reader without the plugin that owns an id sees its values as misses, left in place and
counted (``lmtier_codec_unknown_values_total``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lmtier.keys import KVNamespace

__all__ = [
    "FLOAT_DTYPES",
    "LOSSY_FIELD",
    "PLUGIN_CODEC_IDS",
    "CodecSpec",
    "KVGeometry",
    "ValueCodec",
    "declare_lossy",
]

#: KV dtypes a lossy codec can quantize (the namespace's ``dtype`` strings).
FLOAT_DTYPES = frozenset({"bfloat16", "float16", "float32"})
#: Codec ids third-party codecs choose from (lmtier's own are below).
PLUGIN_CODEC_IDS = range(0x8000, 0x10000)
#: The namespace field (:attr:`~lmtier.keys.KVNamespace.extra`) naming the lossy codecs a
#: namespace's KV may have been through (:func:`declare_lossy`).
LOSSY_FIELD = "lossy_codecs"


def declare_lossy(kv: KVNamespace, tags: tuple[str, ...]) -> KVNamespace:
    """``kv`` naming the lossy codecs ``tags`` (:meth:`ValueCodec.tag`, sorted) in its extra
    fields: the namespace an engine keys its chunks under when a tier of its store quantizes
    (``kv`` itself when ``tags`` is empty, or when it names them already). One rule for a local
    store (:meth:`~lmtier.manager.StorageManager.declare_lossy`) and ``lmtier serve``'s clients."""
    from dataclasses import replace

    if not tags or (LOSSY_FIELD, ",".join(tags)) in kv.extra:
        return kv
    return replace(kv, extra=(*kv.extra, (LOSSY_FIELD, ",".join(tags))))


@dataclass(frozen=True)
class KVGeometry:
    """What a lossy codec knows about the bytes of one chunk (from the engine's namespace).

    A chunk on the host is ``[layers x pages x page_bytes]``; a page is one block of one layer in
    the layout ``kv_layout`` (see :data:`lmtier.transfer.LAYOUT_KINDS`), made of ``dtype``
    elements of which every run of ``head_size`` is one head's vector for one token (K or V).
    A tail chunk has fewer pages than ``chunk_tokens // block_size``; codecs derive the page count
    from the value's length.
    """

    dtype: str
    kv_layout: str
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_size: int
    page_bytes: int

    @classmethod
    def of(cls, kv: KVNamespace) -> KVGeometry:
        return cls(kv.dtype, kv.kv_layout, kv.num_layers, kv.block_size, kv.num_kv_heads, kv.head_size,
                   kv.page_bytes)

    @property
    def element_bytes(self) -> int:
        return {"bfloat16": 2, "float16": 2, "float32": 4}.get(self.dtype, 0)


@runtime_checkable
class ValueCodec(Protocol):
    """One configured codec (an instance per tier; options such as a zstd level are its own).

    Thread safety: ``encode`` and ``decode`` are called from several worker threads at once and
    must not share mutable state between calls (keep per-thread contexts if the library needs
    them). They should release the GIL for the bulk of their work, or the manager's worker
    threads run one at a time.

    Attributes:
        name: the ``codec:`` value in YAML.
        codec_id: the id written in the header (see the module docstring for the ranges).
        lossy: whether ``decode(encode(x))`` may differ from ``x``.
    """

    name: str
    codec_id: int
    lossy: bool

    def tag(self) -> str:
        """For a lossy codec, what enters the namespace: its name and every option that changes
        the decoded bytes (``"fp8-e4m3/vector"``); a lossless codec returns ``""``."""
        ...

    def check_kv(self, kv: KVGeometry) -> str | None:
        """Why this codec cannot encode this KV (``"fp8 quantizes float KV; this KV is int8"``),
        or None if it can. Lossless codecs return None. The manager turns a reason into a
        :class:`~lmtier.errors.ConfigError` when the engine registers the namespace."""
        ...

    def max_encoded_bytes(self, raw_nbytes: int, kv: KVGeometry | None) -> int:
        """An upper bound on ``encode``'s output for a value of ``raw_nbytes`` bytes."""
        ...

    def encode(self, src: memoryview, dst: memoryview, kv: KVGeometry | None) -> int:
        """Encode ``src`` (a flat byte view of the raw value) into ``dst`` (writable, at least
        ``max_encoded_bytes`` long); return the bytes written. ``kv`` is None for values whose
        namespace no engine registered: a lossy codec is never called then (the value is stored
        raw). Raise ``ValueError`` for input the codec cannot encode (the value is then stored
        raw, counted)."""
        ...

    def decode(self, src: memoryview, dst: memoryview) -> None:
        """Decode ``src`` (what ``encode`` wrote) into ``dst``, exactly the raw length (from the
        header). Needs no :class:`KVGeometry`: what decoding needs is in the encoded bytes.
        Raise ``ValueError`` if ``src`` does not decode to exactly ``dst``'s length: the stored
        value is then treated as corrupt (a miss, deleted)."""
        ...


@dataclass(frozen=True)
class CodecSpec:
    """How to build a codec, without importing it (the codec twin of
    :class:`~lmtier.registry.BackendSpec`).

    Attributes:
        name: the ``codec:`` value in YAML (lowercase, unique; ``none`` is reserved).
        codec_id: the header id its values carry (unique).
        factory: ``"module:attr"`` of a callable taking the validated options model and returning
            a :class:`ValueCodec`.
        config: ``"module:attr"`` of a pydantic model for the codec's options (``level`` ...).
        lossy: whether it is lossy (shown by ``lmtier backends``; checked against the instance).
        install_hint: what to run when the factory's imports are missing.
        description: one line for ``lmtier backends``.
    """

    name: str
    codec_id: int
    factory: str
    config: str
    lossy: bool = False
    install_hint: str = ""
    description: str = ""
