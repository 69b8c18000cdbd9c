"""layerboost: make a pretrained LLM cheaper to serve by reducing attention layer by layer
(LayerBoost, arXiv 2604.22050)."""

from .util import version as _version  # noqa: E402

__version__ = _version()

from .cache import HybridCache, expected_cache_bytes  # noqa: E402
from .export import ExportError, export  # noqa: E402
from .models import load_model  # noqa: E402
from .kinds import KINDS  # noqa: E402  (the registry: name -> record)
from .plan import LayerPlan, LayerSpec, PlanError  # noqa: E402
from .surgery import CheckpointError, UnsupportedModelError, convert, load, save  # noqa: E402

__all__ = [
    "KINDS",
    "CheckpointError",
    "ExportError",
    "HybridCache",
    "LayerPlan",
    "LayerSpec",
    "PlanError",
    "UnsupportedModelError",
    "convert",
    "expected_cache_bytes",
    "export",
    "load",
    "load_model",
    "save",
]
