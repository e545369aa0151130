"""torchcvt: CvT, the Convolutional Vision Transformer, exact to the official model."""

__version__ = "0.1.0"

from .config import CvTConfig, list_models, preset_config  # noqa: E402
from .errors import CheckpointError, ConfigError, DataError, ImageError, TorchCvTError  # noqa: E402
from .model import CvT, create_model  # noqa: E402
from .checkpoint import load_model, read_checkpoint, save_pretrained  # noqa: E402
from .summary import summary  # noqa: E402
from .inference import Classifier  # noqa: E402
from .fastpath import apply_fast_path, optimize_for_inference, remove_fast_path  # noqa: E402

__all__ = [
    "CvT", "CvTConfig", "Classifier", "optimize_for_inference", "create_model", "list_models", "preset_config", "load_model", "read_checkpoint",
    "save_pretrained", "summary", "TorchCvTError", "ConfigError", "CheckpointError", "ImageError", "DataError",
    "apply_fast_path", "remove_fast_path",
]
