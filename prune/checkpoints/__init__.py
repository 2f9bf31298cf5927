"""Reading and writing checkpoints: exported pruned models, and Hugging Face / fairseq / torchaudio
HuBERT, wav2vec 2.0 and WavLM checkpoints (``load_pretrained``)."""

from .export import ExportError, check_export_path, describe, export_pruned, load_pruned, read_export_info
from .inspect import inspect_checkpoint
from .keymap import CheckpointError, LoadReport
from .pretrained import load_pretrained

__all__ = ["CheckpointError", "ExportError", "LoadReport", "check_export_path", "describe", "export_pruned",
           "inspect_checkpoint", "load_pretrained", "load_pruned", "read_export_info"]
