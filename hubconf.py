"""torch.hub entry points: one per torchcvt registry name, with ``-`` written ``_``.

    model = torch.hub.load("OWNER/torchcvt", "cvt_13", pretrained=True)        # from GitHub
    model = torch.hub.load("/path/to/torchcvt", "cvt_13", source="local")      # from a checkout
    backbone = torch.hub.load(repo, "cvt_21_384_22k", pretrained=True, features_only=True)

Each entry is ``torchcvt.create_model(name, pretrained, **kwargs)``: the keyword arguments are
create_model's (num_classes, in_chans, global_pool, features_only, out_indices, drop_path_rate,
CvTConfig fields). ``pretrained=True`` loads the public weights through the Hugging Face Hub (and
its local cache); names without public weights say so. The package is imported from this
checkout's ``src/``, so a downloaded copy works without installing it.
"""

import sys
from pathlib import Path as _Path  # names without a leading underscore are what torch.hub.list shows

# Import names torch.hub checks before loading an entry (torchcvt's runtime needs for building a model).
dependencies = ["torch", "numpy", "safetensors", "huggingface_hub", "PIL"]

_SRC = _Path(__file__).resolve().parent / "src"
if str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from torchcvt.pretrained import REGISTRY as _REGISTRY, create_model as _create_model  # noqa: E402  (after the path set-up)


def _entry(name: str):
    entry = _REGISTRY[name]

    def build(pretrained: bool = False, **kwargs):
        return _create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = build.__qualname__ = name.replace("-", "_")
    weights = (f"pretrained=True: the public {entry.pretrained_on} weights, {entry.hub_id} (top-1 {entry.top1} %)"
               if entry.hub_id else "no public weights: pretrained=True raises")
    build.__doc__ = (f"{name}: {entry.layout} at {entry.image_size}x{entry.image_size}, {entry.num_classes} classes; {weights}.\n"
                     "Keyword arguments: those of torchcvt.create_model.")
    return build


globals().update({name.replace("-", "_"): _entry(name) for name in _REGISTRY})
