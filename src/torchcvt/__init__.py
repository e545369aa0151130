"""torchcvt: CvT, the Convolutional Vision Transformer, exact to the official model."""

from .version import __version__
from . import mkl_amd

mkl_amd.enable()  # before anything imports torch: MKL chooses its kernels when torch loads it (mkl_amd.py says why)
from .config import CvTConfig
from .errors import CheckpointError, ConfigError, DataError, HubError, ImageError, TorchCvTError
from .model import CvT, FeatureInfo
from .features import FeatureListNet
from .checkpoint import read_checkpoint, save_pretrained
from .modelcard import write_model_card
from .pretrained import create_model, get_pretrained_cfg, list_models, load_model, load_pretrained, preset_config
from .summary import summary
from .inference import Classifier
from .embed import embed_images
from .hub import push_to_hub
from .fastpath import apply_fast_path, remove_fast_path
from .backends import available_backends, optimize_for_inference

__all__ = [
    "__version__", "CvT", "CvTConfig", "Classifier", "optimize_for_inference", "create_model", "list_models", "preset_config",
    "available_backends", "get_pretrained_cfg", "load_model", "load_pretrained", "read_checkpoint", "save_pretrained", "summary",
    "TorchCvTError", "ConfigError", "CheckpointError", "ImageError", "DataError", "HubError", "apply_fast_path", "remove_fast_path",
    "FeatureInfo", "FeatureListNet", "write_model_card", "push_to_hub", "embed_images",
]
