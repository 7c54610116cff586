"""The embedded default model and data that ship inside the package.

- ``embedded:glow-digits``: a small Glow trained with ``flowtame train`` on the digits below
  (reproduce with ``examples/embedded/train_embedded.sh``).
- ``embedded:digits[:SPLIT][:CLASS]``: the 1,797 8x8 handwritten digits that scikit-learn distributes
  (UCI "Optical Recognition of Handwritten Digits", Alpaydin & Kaynak, CC BY 4.0), SPLIT one of
  all|train|test, CLASS 0-9. See ``flowtame/assets/ATTRIBUTION.md``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from flowtame.errors import InputError

PREFIX = "embedded:"
MODELS = {"glow-digits": "glow-digits.safetensors"}


def asset_path(name: str) -> Path:
    return Path(str(resources.files("flowtame") / "assets" / name))


def resolve_model_path(model: str | Path) -> Path:
    """A checkpoint path, with ``embedded:NAME`` mapped to the file shipped in the package."""
    text = str(model)
    if not text.startswith(PREFIX):
        return Path(text)
    name = text[len(PREFIX):]
    if name not in MODELS:
        raise InputError(f"{text}: unknown embedded model (known: {', '.join(PREFIX + m for m in MODELS)})")
    return asset_path(MODELS[name])
