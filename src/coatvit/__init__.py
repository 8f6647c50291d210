"""coatvit: CoaT (Co-Scale Conv-Attentional Image Transformers) models, weights, training and export."""

from .config import PRETRAINED, VARIANTS, CoaTConfig, PretrainedEntry
from .errors import CoaTError, DataError, PretrainedUnavailableError, UnknownModelError, WeightsError
from .model import CoaT
from .registry import create_model, get_config, list_models
from .runtime import tune_cpu_allocator
from .weights import load_weights, read_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    "CoaT", "CoaTConfig", "PretrainedEntry", "PRETRAINED", "VARIANTS",
    "create_model", "list_models", "get_config", "load_weights", "save_weights", "read_weights", "tune_cpu_allocator",
    "CoaTError", "DataError", "PretrainedUnavailableError", "UnknownModelError", "WeightsError",
]
