"""Flow architectures and the registry that rebuilds a model from its name and hyperparameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowtame.flows.base import MultiScaleFlow
from flowtame.flows.glow import GlowSpec, build_glow


@dataclass(frozen=True)
class Architecture:
    """``spec_class(**hyperparameters)`` validates; ``build(spec)`` makes a fresh model. ``kind``: image|vector."""

    name: str
    spec_class: type
    build: Callable[[Any], MultiScaleFlow]
    kind: str


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> None:
    ARCHITECTURES[arch.name] = arch


register(Architecture("glow", GlowSpec, build_glow, "image"))


def make_spec(architecture: str, hyperparameters: dict) -> Any:
    """Validate hyperparameters for ``architecture``; raises ValueError with a readable reason."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r} (known: {', '.join(sorted(ARCHITECTURES))})")
    try:
        return ARCHITECTURES[architecture].spec_class(**hyperparameters)
    except TypeError as exc:
        raise ValueError(f"bad hyperparameters for {architecture}: {exc}") from None


def build_model(architecture: str, spec: Any) -> MultiScaleFlow:
    return ARCHITECTURES[architecture].build(spec)


def _register_optional() -> None:
    """Architectures in their own modules register themselves on import."""
    import importlib

    for module in ("flowtame.flows.realnvp", "flowtame.flows.nice", "flowtame.flows.vector",
                   "flowtame.flows.tarflow"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # module not written yet in this tree
            if exc.name != module:
                raise


_register_optional()

__all__ = ["ARCHITECTURES", "Architecture", "GlowSpec", "MultiScaleFlow", "build_glow", "build_model",
           "make_spec", "register"]
