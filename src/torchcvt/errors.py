"""Exceptions with one-line messages. The CLI prints them as ``error: <message>`` without a traceback."""


class TorchCvTError(Exception):
    """Base class of every error torchcvt raises on purpose (bad input, not a bug)."""


class ConfigError(TorchCvTError, ValueError):
    """A CvTConfig field or a combination of fields is invalid."""


class CheckpointError(TorchCvTError, ValueError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into."""


class ImageError(TorchCvTError, ValueError):
    """An image file is missing, corrupt, truncated or not an image."""


class DataError(TorchCvTError, ValueError):
    """A dataset is missing, empty or malformed."""


class OutputError(TorchCvTError, OSError):
    """An output file cannot be written: its folder is missing or read-only, or it is a directory."""


class DiskFullError(OutputError):
    """The disk (or the quota) filled up while writing; the file being replaced is intact."""


class ExportError(TorchCvTError):
    """An export failed or did not pass its check; the output file was left as it was."""


class HubError(TorchCvTError):
    """The Hugging Face Hub cannot be reached, refuses a request, or is switched off (offline mode)."""
