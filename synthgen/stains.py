"""The stain vocabulary: canonical stain names and their aliases (a base module: data, models,
pipelines and the CLI all read it)."""

from __future__ import annotations

import re

from synthgen.errors import StainError

# canonical name -> aliases (matched after lower-casing and dropping everything but a-z, 0-9)
STAINS: dict[str, tuple[str, ...]] = {
    "he": ("H&E", "HE", "H and E", "hematoxylin-eosin", "haematoxylin and eosin", "hematoxylin and eosin"),
    "hematoxylin": ("haematoxylin", "H", "hema", "hematoxylin only"),
    "ki67": ("Ki-67", "MKI67", "MIB-1", "MIB1"),
    "her2": ("HER-2", "HER2/neu", "ERBB2", "c-erbB-2"),
    "er": ("ER", "estrogen receptor", "oestrogen receptor", "ESR1", "ER-alpha"),
    "pr": ("PR", "PgR", "progesterone receptor"),
    "panck": ("PanCK", "pan-CK", "pancytokeratin", "pan-cytokeratin", "cytokeratin", "AE1/AE3"),
    "cd31": ("CD-31", "PECAM-1", "PECAM1"),
    "cd3": ("CD-3",),
    "cd8": ("CD-8",),
    "p53": ("TP53",),
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ALIASES = {_key(a): canon for canon, aliases in STAINS.items() for a in (canon, *aliases)}


def resolve_stain(name: str) -> str:
    """Canonical name of a stain: ``"Ki-67"`` -> ``"ki67"``, ``"PanCytokeratin"`` -> ``"panck"``.

    Raises:
        StainError: unknown name (the message lists the known names).
    """
    canon = _ALIASES.get(_key(str(name)))
    if canon is None:
        raise StainError(f"unknown stain {name!r}; known stains: {', '.join(STAINS)} "
                         "(aliases such as 'H&E', 'Ki-67', 'PanCytokeratin', 'HER2/neu' work too)")
    return canon
