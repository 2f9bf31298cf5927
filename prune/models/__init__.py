"""HuBERT / wav2vec 2.0 / WavLM encoders in torchaudio's vocabulary."""

from .components import PhantomLayerNorm, Wav2Vec2Model
from .config import SAMPLE_RATE, EncoderConfig
from .gating import ExtractorGates, Gates, LayerGates
from .model import (PRESETS, build_encoder, build_preset, hubert_base, hubert_large, preset_config, wav2vec2_base,
                    wav2vec2_large_lv60k, wav2vec2_model, wavlm_base, wavlm_base_plus, wavlm_large)

__all__ = ["EncoderConfig", "ExtractorGates", "Gates", "LayerGates", "PhantomLayerNorm", "Wav2Vec2Model", "SAMPLE_RATE", "PRESETS",
           "build_encoder", "build_preset", "preset_config", "wav2vec2_model", "hubert_base", "hubert_large",
           "wav2vec2_base", "wav2vec2_large_lv60k", "wavlm_base", "wavlm_base_plus", "wavlm_large"]
