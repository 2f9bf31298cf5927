"""Latency tables: measured seconds of each block kind of an encoder over a grid of kept widths on
one machine (``prune profile`` writes them), and the latency of a plain config or the expected,
differentiable latency of a gated encoder read from one.

A model's latency is the sum of its parts read through the table's line, ``offset + scale x parts``
(fitted to whole passes of the unpruned and of a few cut models, timed together with the parts:
``prune.latency_profile``; a table without ``offset`` has 0 there): the fixed parts (waveform normalisation, positional
conv, the transformer's LayerNorms), each conv layer at its kept (input, output) channels, the
feature projection at the last conv layer's kept channels, and each transformer layer's attention
block at its kept heads and FFN block at its kept units (a removed block costs nothing; a block
with no heads or units left still adds its output bias: the grid's 0). Between grid points the
table is interpolated piecewise linearly (bilinearly for a conv layer's two widths), extended
linearly past the ends; at the eval masks' whole counts of a gated encoder that is exactly the
value a plain config with those counts reads, and in between (expected counts) it is
differentiable almost everywhere, so the Lagrangian can drive it (``prune.measures``: the
``latency`` and ``latency_ms`` measures).

The JSON (``FORMAT``, ``VERSION``)::

    {"format": "prune-latency-table", "version": 1,
     "machine": {"platform", "cpu", "torch", "device"}, "threads", "seconds", "batch", "repeats",
     "model": {fingerprint: what must match the model pruned, see ``fingerprint``},
     "fixed": s, "conv": [{"in": [..], "out": [..], "seconds": [[s per out] per in]} per conv layer],
     "projection": {"channels": [..], "seconds": [..]}, "attention": {"heads": [..], "seconds": [..]},
     "ffn": {"units": [..], "seconds": [..]}, "scale": the line's slope, "offset": s (optional, 0),
     "whole": {"measured": s, "parts": s, "fit": [{"sparsity", "parts", "measured"} per whole pass]},
     "clock": "wall" | "thread", "allocator": how the timings' allocator was set (``prune.allocator``;
     absent in tables made before it)}

All times are the fastest of ``repeats`` interleaved passes, batch ``batch``, ``seconds`` of audio.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .atomic import atomic_write
from .models.config import EncoderConfig
from .structures import (AttentionBlock, ConvChannels, FeatureProjectionInput, FeedForwardBlock, GatedEncoder, HiddenDim,
                         Structure, structures_of)

FORMAT = "prune-latency-table"
VERSION = 1


class LatencyTableError(ValueError):
    """A latency table that cannot serve: malformed, another version, or made for another model or
    thread count. The message is one line naming the file and what to do."""


def fingerprint(config: EncoderConfig) -> Dict[str, Any]:
    """What a table's model and the model pruned must share: everything that shapes the blocks'
    work but the widths pruning changes (kept channels, heads, units, blocks)."""
    return {"architecture": config.architecture, "extractor_mode": config.extractor_mode,
            "conv_geometry": [[k, s] for _, k, s in config.extractor_conv_layer_config],
            "conv_bias": config.extractor_conv_bias, "embed_dim": config.encoder_embed_dim,
            "head_dim": config.encoder_head_dim, "num_layers": config.encoder_num_layers,
            "layer_norm_first": config.encoder_layer_norm_first,
            "pos_conv": [config.encoder_pos_conv_kernel, config.encoder_pos_conv_groups],
            "normalize_waveform": config.normalize_waveform,
            "num_buckets": config.encoder_num_buckets if config.is_wavlm else None}


def machine(device: str) -> Dict[str, str]:
    """Where a table was made: the platform, the CPU model (/proc/cpuinfo), torch, the device."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name()})"
    return {"platform": platform.platform(), "cpu": cpu, "torch": torch.__version__, "device": device}


# ------------------------------------------------------------------------------ interpolation
def interp1(xs: Tensor, ys: Tensor, x: Tensor) -> Tensor:
    """Piecewise-linear y(x) through the grid (xs ascending, (n,)), extended linearly past both
    ends; differentiable in x (a scalar) except at the grid points. One point: the constant."""
    if xs.numel() == 1:
        return ys[0] + 0.0 * x
    i = torch.searchsorted(xs, x.detach().reshape(1)).clamp(1, xs.numel() - 1)[0]
    x0, x1 = xs[i - 1], xs[i]
    return ys[i - 1] + (x - x0) / (x1 - x0) * (ys[i] - ys[i - 1])


def interp2(xs: Tensor, ys: Tensor, zs: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Bilinear z(x, y) on the grid xs (n,) x ys (m,), zs (n, m): piecewise linear in y on each
    row, then in x across the rows."""
    rows = torch.stack([interp1(ys, zs[i], y) for i in range(xs.numel())])
    return interp1(xs, rows, x)


# -------------------------------------------------------------------------------------- table
@dataclass(frozen=True)
class LatencyTable:
    """A loaded latency table (see the module docstring); ``path`` names it in messages."""

    data: Dict[str, Any]
    path: str = "<latency table>"

    @property
    def threads(self) -> int:
        return int(self.data["threads"])

    @property
    def seconds(self) -> float:
        return float(self.data["seconds"])

    @property
    def batch(self) -> int:
        return int(self.data["batch"])

    def _grid(self, like: Tensor):
        """The grids as float64 tensors (``like``'s device), built once per device."""
        cache = self.__dict__.setdefault("_grids", {})
        if like.device not in cache:
            t = lambda v: torch.tensor(v, dtype=torch.float64, device=like.device)  # noqa: E731
            d = self.data
            cache[like.device] = {
                "conv": [(t(c["in"]), t(c["out"]), t(c["seconds"])) for c in d["conv"]],
                "projection": (t(d["projection"]["channels"]), t(d["projection"]["seconds"])),
                "attention": (t(d["attention"]["heads"]), t(d["attention"]["seconds"])),
                "ffn": (t(d["ffn"]["units"]), t(d["ffn"]["seconds"]))}
        return cache[like.device]

    def check_model(self, config: EncoderConfig, what: str = "the model") -> None:
        """LatencyTableError unless the table was profiled for ``config``'s kind of model and its
        grid covers ``config``'s widths."""
        mine, theirs = self.data["model"], fingerprint(config)
        differ = [k for k in theirs if mine.get(k) != theirs[k]]
        if differ:
            k = differ[0]
            raise LatencyTableError(f"{self.path}: the table was profiled for another model ({k} {mine.get(k)} vs "
                                    f"{theirs[k]} in {what}); profile this one: prune profile --preset P | MODEL "
                                    f"--out FILE")
        d = self.data
        wide = [("conv layer", i, c, d["conv"][i]["out"][-1])
                for i, (c, _, _) in enumerate(config.extractor_conv_layer_config) if c > d["conv"][i]["out"][-1]]
        wide += [("heads of layer", i, h, d["attention"]["heads"][-1]) for i, h in enumerate(config.encoder_num_heads)
                 if h > d["attention"]["heads"][-1]]
        wide += [("FFN units of layer", i, u, d["ffn"]["units"][-1])
                 for i, u in enumerate(config.encoder_ff_interm_features) if u > d["ffn"]["units"][-1]]
        if wide:
            name, i, n, top = wide[0]
            raise LatencyTableError(f"{self.path}: {what} has {n} {name} {i}, beyond the table's grid (up to {top}); "
                                    f"profile the unpruned model")

    def check_threads(self, threads: Optional[int], key: str = "trainer.threads") -> None:
        """LatencyTableError unless ``threads`` is the table's thread count."""
        if threads != self.threads:
            raise LatencyTableError(f"{self.path}: the table was profiled with {self.threads} thread(s), but {key}="
                                    f"{'null' if threads is None else threads}; set {key}={self.threads} or "
                                    f"profile with --threads {threads or 'T'}")

    # --------------------------------------------------------------------------- latency
    def structures_latency(self, config: EncoderConfig, structures: Sequence[Structure], like: Tensor) -> Tensor:
        """Seconds of the model ``structures`` describe (the plain config's, or a gated encoder's
        expected), float64 like ``like``: each structure at its kept counts (keep vectors summed),
        a transformer block times P(block kept), as the cost formulas do."""
        grid = self._grid(like)
        total = like + float(self.data["fixed"])
        convs = [s for s in structures if isinstance(s, ConvChannels)]
        for s in structures:
            if isinstance(s, ConvChannels):
                xs, ys, zs = grid["conv"][s.index]
                total = total + interp2(xs, ys, zs, s.input_keep(like).sum(), s.channel_keep(like).sum())
            elif isinstance(s, FeatureProjectionInput):  # it reads the last conv layer's channels
                total = total + interp1(*grid["projection"], convs[-1].channel_keep(like).sum())
            elif isinstance(s, (AttentionBlock, FeedForwardBlock)):
                if not s.exists:  # removed: the layer is a residual path there
                    continue
                if isinstance(s, AttentionBlock) and (s.qk_gate is not None or s.v_gate is not None or
                                                      (s.qk_dim, s.v_dim) != (config.encoder_head_dim,) * 2):
                    raise LatencyTableError(f"{self.path}: latency tables time heads of the full width only; "
                                            f"set pruning.gates.head_qk_dims=false and head_v_dims=false with a "
                                            f"latency target")
                keep = s.keep(like)
                curve = grid["attention" if isinstance(s, AttentionBlock) else "ffn"]
                total = total + keep[s.block_kind][0] * interp1(*curve, keep[s.unit_kind].sum())
            elif isinstance(s, HiddenDim):  # ungated and uncut, its parts are the table's fixed ones
                if s.gates() or config.encoder_hidden_total not in (None, config.encoder_embed_dim):
                    raise LatencyTableError(f"{self.path}: latency tables do not time a pruned hidden dimension "
                                            f"yet; set pruning.gates.hidden_dim=false with a latency target")
            else:  # a structure the table does not know: fail loudly rather than leave it out
                raise LatencyTableError(f"{self.path}: no latency entry for structure kind {s.kind!r}")
        return (total * float(self.data["scale"]) + float(self.data.get("offset", 0.0))).clamp(min=0.0)

    def latency(self, config: EncoderConfig) -> float:
        """Seconds of a plain model built from ``config`` (interpolated at its kept counts)."""
        self.check_model(config)
        return float(self.structures_latency(config, structures_of(config),
                                             torch.zeros((), dtype=torch.float64)).item())

    def expected(self, gated: GatedEncoder) -> Tensor:
        """Expected seconds of ``gated`` (a differentiable float64 scalar); in eval mode, the
        latency of the model its cut gives."""
        like = next(gated.model.parameters()).new_zeros((), dtype=torch.float64)
        return self.structures_latency(gated.config, gated.structures, like)


# ------------------------------------------------------------------------------------- files
def _finite_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)


def _ascending(v: List[float]) -> bool:
    return all(a < b for a, b in zip(v, v[1:]))


def validate(data: Any, path: str) -> None:
    """LatencyTableError (one line) for anything a table must hold but this one does not."""
    def bad(what: str) -> LatencyTableError:
        return LatencyTableError(f"{path}: not a usable latency table ({what}); make one with prune profile")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"no \"format\": \"{FORMAT}\"")
    if data.get("version") != VERSION:
        raise LatencyTableError(f"{path}: latency table version {data.get('version')!r}, this prune reads version "
                                f"{VERSION}; profile again with prune profile")
    for key in ("machine", "model"):
        if not isinstance(data.get(key), dict):
            raise bad(f"{key!r} missing")
    for key in ("threads", "batch"):
        if not (isinstance(data.get(key), int) and data[key] >= 1):
            raise bad(f"{key!r} must be a whole number >= 1")
    if not _finite_list([data.get("seconds"), data.get("fixed"), data.get("scale"), data.get("offset", 0.0)]) \
            or data["seconds"] <= 0 or data["scale"] <= 0:
        raise bad("'seconds', 'fixed', 'scale' and 'offset' must be numbers, 'seconds' and 'scale' above 0")
    curves = [("projection", "channels"), ("attention", "heads"), ("ffn", "units")]
    for part, axis in curves:
        c = data.get(part)
        if not (isinstance(c, dict) and _finite_list(c.get(axis)) and _finite_list(c.get("seconds"))
                and len(c[axis]) == len(c["seconds"]) and _ascending(c[axis])):
            raise bad(f"{part}: an ascending {axis!r} grid and one 'seconds' value per point")
    convs = data.get("conv")
    if not isinstance(convs, list) or len(convs) != len(data["model"].get("conv_geometry") or []):
        raise bad("'conv': one entry per conv layer of the model")
    for i, c in enumerate(convs):
        ok = (isinstance(c, dict) and _finite_list(c.get("in")) and _finite_list(c.get("out"))
              and _ascending(c["in"]) and _ascending(c["out"]) and isinstance(c.get("seconds"), list)
              and len(c["seconds"]) == len(c["in"]) and all(_finite_list(r) and len(r) == len(c["out"])
                                                            for r in c["seconds"]))
        if not ok:
            raise bad(f"conv layer {i}: ascending 'in' and 'out' grids and a seconds row per 'in' value")


def load_table(path: os.PathLike) -> LatencyTable:
    """Read and validate a latency table; LatencyTableError (one line) if it cannot serve."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LatencyTableError(f"{path}: no such latency table (make one with prune profile ... --out {path})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LatencyTableError(f"{path}: not a usable latency table ({type(e).__name__}: {e}); make one with "
                                f"prune profile") from None
    validate(data, str(path))
    return LatencyTable(data, str(path))


def save_table(data: Dict[str, Any], path: os.PathLike) -> Path:
    """Validate and write a table whole or not at all (``prune.atomic``)."""
    validate(data, str(path))
    return atomic_write(Path(path), lambda f: f.write(json.dumps(data, indent=1) + "\n"), mode="w")
