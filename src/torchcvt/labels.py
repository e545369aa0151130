"""ImageNet-1k class names, in class-index order.

The names are exactly those of the ``id2label`` in the public CvT checkpoints' ``config.json``
(the WordNet synset lemmas, e.g. index 0 is ``"tench, Tinca tinca"``), so predictions print the
same here and there. They ship as ``torchcvt/resources/imagenet1k_labels.txt``, one name a line,
so that nothing has to be downloaded.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def _labels() -> tuple[str, ...]:
    path = resources.files("torchcvt") / "resources" / "imagenet1k_labels.txt"
    return tuple(path.read_text(encoding="utf-8").splitlines())


def imagenet_labels() -> list[str]:
    """The 1000 class names; a new list each call, so callers cannot alter the cached names."""
    return list(_labels())


def imagenet_id2label() -> dict[int, str]:
    """``{class index: name}``, the form of a ``config.json``'s ``id2label``."""
    return dict(enumerate(_labels()))
