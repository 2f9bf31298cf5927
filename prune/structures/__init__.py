"""What can be pruned: each structure's gates, its cost as a function of kept counts, and its cut
recorded into a shared ``CutPlan``, behind one protocol (``base.Structure``).

Modules: ``costs`` (the cost formulas), ``cut_plan`` (the plan compile applies), ``base`` (the
protocol, ``GateConfig``, gate kinds), ``extractor``, ``transformer`` and ``hidden`` (the structures),
``encoder`` (``GatedEncoder`` and the plain models' ``count_params`` / ``count_macs``, summed over
the same structures), ``shown`` (what the reports show of each kind).
"""

from .base import (ATTENTION_BLOCK, CONV_CHANNELS, FFN_BLOCK, FFN_UNITS, GATE_KINDS, HEAD_QK_DIMS, HEAD_V_DIMS,
                   HEADS, HIDDEN, NO_GATES, GateConfig, Structure)
from .costs import (any_kept, attention_macs, attention_params, conv_frames, conv_macs, conv_params,
                    feed_forward_macs, feed_forward_params, fixed_params, hidden_norm_params, pos_conv_macs,
                    pos_conv_params, projection_params)
from .cut_plan import CutPlan, CutPlanError
from .encoder import GatedEncoder, count_macs, count_params, structures_of
from .extractor import ConvChannels, FeatureProjectionInput
from .hidden import HiddenDim
from .shown import SHOWN, Shown
from .transformer import AttentionBlock, FeedForwardBlock

__all__ = ["ATTENTION_BLOCK", "CONV_CHANNELS", "FFN_BLOCK", "FFN_UNITS", "GATE_KINDS", "HEAD_QK_DIMS", "HEAD_V_DIMS",
           "HEADS", "HIDDEN", "NO_GATES",
           "GateConfig", "Structure", "CutPlan", "CutPlanError", "GatedEncoder", "count_macs", "count_params",
           "structures_of", "ConvChannels", "FeatureProjectionInput", "HiddenDim", "AttentionBlock", "FeedForwardBlock",
           "SHOWN", "Shown", "any_kept", "attention_macs", "attention_params", "conv_frames", "conv_macs",
           "conv_params", "feed_forward_macs", "feed_forward_params", "fixed_params", "pos_conv_macs",
           "pos_conv_params", "hidden_norm_params", "projection_params"]
