"""prune: structured pruning of self-supervised speech encoders (HuBERT, wav2vec 2.0, WavLM).

The library needs torch (and safetensors for exports) only.
"""

from .checkpoints import CheckpointError, ExportError, export_pruned, inspect_checkpoint, load_pretrained, load_pruned
from .compile import compile_encoder
from .gates import HardConcrete
from .measured import measured_macs, num_params
from .models import EncoderConfig, Wav2Vec2Model, build_encoder, build_preset, preset_config, wav2vec2_model
from .structures import GateConfig, GatedEncoder, count_macs, count_params

__version__ = "0.1.0"

__all__ = ["CheckpointError", "EncoderConfig", "ExportError", "GateConfig", "GatedEncoder", "HardConcrete",
           "Wav2Vec2Model", "build_encoder", "build_preset", "compile_encoder", "count_macs", "count_params",
           "export_pruned", "inspect_checkpoint", "load_pretrained", "load_pruned", "measured_macs", "num_params",
           "preset_config", "wav2vec2_model"]
