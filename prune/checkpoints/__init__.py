"""Reading and writing checkpoints: exported pruned models (and, later, HF / fairseq / torchaudio)."""

from .export import ExportError, check_export_path, describe, export_pruned, load_pruned, read_export_info

__all__ = ["ExportError", "check_export_path", "describe", "export_pruned", "load_pruned", "read_export_info"]
