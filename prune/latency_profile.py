"""The profiler behind ``prune profile``: times the real modules of an encoder (``prune.models``) at
each grid width on this machine and makes a latency table (``prune.latency``).

Every block kind is built at each grid point with the shape a compiled model gives it (a conv
layer at kept in/out channels with its norm over the unpruned count, the feature projection with
its phantom once channels are removed, an attention block at kept heads, an FFN at kept units,
each block with its residual add and, pre-norm, its LayerNorm), fed a random input of the shape it
sees for ``seconds`` of audio and ``batch`` utterances, and all of them are timed round-robin
(``prune.measured.interleaved``), the fastest of ``repeats`` kept: load on a shared machine hits
every grid point alike.

The parts timed one by one do not add up to a whole pass: at HuBERT Base (1 s, one thread) they
come to about 8% less, alike at every sparsity (what runs between the blocks, the allocator and
cache state a block finds inside a pass and not alone); on a model as small as the demo's, cut
models ran 4-27% slower than their parts said (40-50% before the timings' allocator was made
steady: ``prune.allocator``), a cost per pass that does not shrink with the widths. So the profile also times whole passes in the same rounds, of the unpruned model and of
``fit_states`` models cut at seeded random gate states (``FIT_SPARSITIES``), and fits
``whole = offset + scale x parts`` to them by least squares: every prediction is read through that
line (``fit_states=0``, the default: the unpruned pass alone, ``scale = whole / parts``, no offset;
the line is not yet shown to predict better: docs/performance.md, section 7).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import allocator
from .latency import FORMAT, VERSION, LatencyTable, fingerprint, load_table, machine
from .measured import fastest, interleaved
from .models.components import (ConvLayerBlock, ConvolutionalPositionalEmbedding, FeatureProjection, FeedForward,
                                PhantomLayerNorm, RelativePositionBias, SelfAttention, WavLMSelfAttention,
                                normalize_waveforms)
from .models.config import SAMPLE_RATE, EncoderConfig
from .compile import compile_encoder
from .models.model import build_encoder
from .seeded import set_random_gates
from .structures import GatedEncoder, conv_frames


def widths(full: int, points: int, low: int = 4) -> List[int]:
    """0, then ``low`` halvings below full/points (full/(2 points), full/(4 points), ...), then
    ``points`` widths evenly up to ``full`` (full/points, ..., full); no repeats. Small blocks cost
    mostly fixed overhead, not width: a linear stretch from full/points down to 0 overestimates
    them (a conv layer at 17 channels by 3x at HuBERT Base shape), hence the denser low end."""
    even = {round(full * k / points) for k in range(1, points + 1)}
    halvings = {round(full / points / 2 ** k) for k in range(1, low + 1)}
    return sorted({0, *(w for w in even | halvings if w >= 1)})


# wall: elapsed time (what a user waits); thread: this thread's CPU time, which other processes' load
# on a shared machine does not inflate (a 150 ms forward pass on a core shared with others is
# preempted in every repeat, a 1 ms block is not: wall-clock tables then under-predict whole models)
CLOCKS: Dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


def check_clock(clock: str, threads: int, device: str) -> None:
    """ValueError (one line) for a clock that cannot time this profile."""
    if clock not in CLOCKS:
        raise ValueError(f"--clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "thread" and (threads != 1 or device != "cpu"):
        raise ValueError("--clock thread counts one CPU thread's time: use it with --threads 1 --device cpu")


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


FIT_SPARSITIES = (0.5, 0.75, 0.9, 0.6, 0.8, 0.95)  # the cut models of the fit, the first fit_states of them


def check_fit_states(fit_states: int) -> None:
    """ValueError (one line) for a number of fitted cut models the profile cannot time."""
    if not 0 <= fit_states <= len(FIT_SPARSITIES):
        raise ValueError(f"--fit-states must be in [0, {len(FIT_SPARSITIES)}], got {fit_states}")


def fit_line(parts: Sequence[float], measured: Sequence[float]) -> Tuple[float, float]:
    """(scale, offset) of the least-squares line ``measured = offset + scale x parts``; with one
    point, or a line that would not rise (noise at a degenerate spread), the ratio through the
    first point (the unpruned model) and no offset."""
    n = len(parts)
    if n > 1:
        mp, mm = sum(parts) / n, sum(measured) / n
        var = sum((p - mp) ** 2 for p in parts)
        if var > 0:
            scale = sum((p - mp) * (m - mm) for p, m in zip(parts, measured)) / var
            if scale > 0:
                return scale, mm - scale * mp
    return measured[0] / parts[0], 0.0


def profile(config: EncoderConfig, seconds: float = 1.0, batch: int = 1, threads: int = 1, device: str = "cpu",
            repeats: int = 10, conv_points: int = 4, ffn_points: int = 8, head_points: Optional[int] = None,
            progress: Optional[Callable[[str], None]] = None, clock: str = "wall", fit_states: int = 0) -> Dict[str, Any]:
    """The latency table (a dict, ``prune.latency``'s JSON) of ``config``'s model on this machine.

    conv_points / ffn_points: even grid widths per conv axis / for the FFN units (``widths``: plus 0
    and a few halvings below the first);
    head_points: None for every head count 0..H, else that many plus 0. The caller sets torch's
    threads (``threads`` is recorded). clock: ``CLOCKS`` (``thread``: one CPU thread only).
    fit_states: cut models timed whole for the table's line (module docstring)."""
    check_clock(clock, threads, device)
    check_fit_states(fit_states)
    with torch.no_grad(), warnings.catch_warnings():  # a block at 0 channels has zero-size weights
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        timed = plan(config, seconds, batch, threads, device, conv_points, ffn_points, head_points, fit_states)
        if progress is not None:
            progress(f"timing {len(timed.fns)} modules x {repeats} repeats, interleaved ({timed.frames} frames, "
                     f"batch {batch}, {torch.get_num_threads()} thread(s), {device}) ...")
        return timed.table(interleaved(timed.fns, repeats, warmup=2, clock=CLOCKS[clock]), repeats, clock)


@dataclass
class Plan:
    """The timed calls of a profile (name -> call, each one grid point; the modules and inputs
    live in their closures) and how their times make the table (``table``). Other timings can
    join ``fns`` in one interleaved round (scripts/latency_error.py times the cut models so)."""

    fns: Dict[str, Callable[[], Any]]
    frames: int
    make: Callable[[Dict[str, float]], Dict[str, Any]]

    def table(self, times: Dict[str, Sequence[float]], repeats: int, clock: str = "wall") -> Dict[str, Any]:
        """The table from each call's repeated seconds (the fastest of each is kept)."""
        return {**self.make({k: fastest(times[k]) for k in self.fns}), "repeats": repeats, "clock": clock}


def plan(config: EncoderConfig, seconds: float = 1.0, batch: int = 1, threads: int = 1, device: str = "cpu",
         conv_points: int = 4, ffn_points: int = 8, head_points: Optional[int] = None, fit_states: int = 0) -> Plan:
    """Build every grid point's module and input (see ``profile``); call under ``torch.no_grad()``."""
    dev = torch.device(device)
    sync = _sync(dev)
    D, eps = config.encoder_embed_dim, config.layer_norm_eps
    samples = int(round(seconds * SAMPLE_RATE))
    frames = conv_frames(config, seconds)
    if frames[-1] < 1:
        raise ValueError(f"{seconds} s of audio gives no frame; profile at least 0.025 s")
    T = frames[-1]
    fns: Dict[str, Callable[[], Any]] = {}

    def add(name: str, module: nn.Module, fn: Callable[[nn.Module], Any]) -> None:
        module = module.to(dev).eval()
        fns[name] = lambda: (fn(module), sync())

    # conv layers: (kept in, kept out) -> seconds; layer 0 reads the waveform's one channel
    full = [c for c, _, _ in config.extractor_conv_layer_config]
    conv_grid = []
    for i, (_, kernel, stride) in enumerate(config.extractor_conv_layer_config):
        ins = [1] if i == 0 else widths(full[i - 1], conv_points)  # layer 0 reads the waveform
        outs = widths(full[i], conv_points)
        conv_grid.append((ins, outs))
        frames_in = samples if i == 0 else frames[i - 1]
        for c_in in ins:
            x = torch.randn(batch, c_in, frames_in, device=dev)
            for c_out in outs:
                norm = None
                if config.extractor_mode == "layer_norm":
                    norm = PhantomLayerNorm(c_out, full[i], eps)
                elif i == 0:  # one group per channel, as the builder (which keeps an empty one at 0)
                    norm = nn.GroupNorm(max(c_out, 1), c_out, eps=eps)
                block = ConvLayerBlock(c_in, c_out, kernel, stride, config.extractor_conv_bias, norm)
                add(f"conv{i}:{c_in}:{c_out}", block, lambda m, x=x: m(x, None))
    # the feature projection at the last layer's kept channels (its input is the transposed conv output)
    channels = widths(full[-1], conv_points)
    for c in channels:
        x = torch.randn(batch, c, T, device=dev).transpose(1, 2)
        add(f"projection:{c}", FeatureProjection(c, D, 0.0, full[-1], eps), lambda m, x=x: m(x))
    # transformer blocks: every layer has the same input shape, so one curve serves them all
    H = max(config.encoder_num_heads)
    heads = list(range(H + 1)) if head_points is None else widths(H, head_points, low=0)
    units = widths(max(config.encoder_ff_interm_features), ffn_points)
    x = torch.randn(batch, T, D, device=dev)
    bias = None
    if config.is_wavlm:
        bias = RelativePositionBias(config.encoder_num_buckets, config.encoder_max_distance,
                                    config.original_num_heads).to(dev)(T)
    pre = config.encoder_layer_norm_first
    for h in heads:
        if config.is_wavlm:
            attention = WavLMSelfAttention(D, h, config.encoder_head_dim, 0.0, list(range(h)))
        else:
            attention = SelfAttention(D, h, config.encoder_head_dim, 0.0)
        add(f"attention:{h}", _Block(attention, D, eps, pre and h > 0), lambda m: m(x, bias))
    for u in units:
        add(f"ffn:{u}", _Block(FeedForward(D, u, 0.0, 0.0), D, eps, pre and u > 0), lambda m: m(x))
    wave = torch.randn(batch, samples, device=dev)
    add("fixed", _Fixed(config), lambda m: m(wave, x))
    add("whole", build_encoder(config), lambda m: m(wave))  # the unpruned model's whole pass: the scale
    cuts = {0.0: config}  # sparsity -> the config timed whole under "whole" / "whole:SPARSITY"
    for k, sparsity in enumerate(FIT_SPARSITIES[:fit_states]):
        gated = GatedEncoder(build_encoder(config))
        set_random_gates(gated, sparsity, seed=k)
        cut = compile_encoder(gated.eval())
        cuts[sparsity] = cut.config
        add(f"whole:{sparsity:g}", cut, lambda m: m(wave))

    def make(times: Dict[str, float]) -> Dict[str, Any]:
        table = {"format": FORMAT, "version": VERSION, "machine": machine(device), "threads": threads,
                 "seconds": seconds, "batch": batch, "model": fingerprint(config), "fixed": times["fixed"],
                 "conv": [{"in": ins, "out": outs, "seconds": [[times[f"conv{i}:{a}:{b}"] for b in outs]
                                                               for a in ins]} for i, (ins, outs) in enumerate(conv_grid)],
                 "projection": {"channels": channels, "seconds": [times[f"projection:{c}"] for c in channels]},
                 "attention": {"heads": heads, "seconds": [times[f"attention:{h}"] for h in heads]},
                 "ffn": {"units": units, "seconds": [times[f"ffn:{u}"] for u in units]}, "scale": 1.0}
        read = LatencyTable(table)
        points = [{"sparsity": sp, "parts": read.latency(c), "measured": times["whole" if sp == 0 else f"whole:{sp:g}"]}
                  for sp, c in cuts.items()]
        scale, offset = fit_line([q["parts"] for q in points], [q["measured"] for q in points])
        return {**table, "scale": scale, "offset": offset, "allocator": allocator.state(),
                "whole": {"measured": points[0]["measured"], "parts": points[0]["parts"], "fit": points}}

    return Plan(fns, T, make)


class _Block(nn.Module):
    """A transformer block as a layer runs it: [LayerNorm ->] block -> residual add."""

    def __init__(self, block: nn.Module, embed_dim: int, eps: float, norm: bool):
        super().__init__()
        self.block = block
        self.norm = nn.LayerNorm(embed_dim, eps=eps) if norm else None

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        """x: (batch, frames, embed_dim) -> same shape."""
        h = x if self.norm is None else self.norm(x)
        if isinstance(self.block, SelfAttention):
            return x + self.block(h, None, *args)
        return x + self.block(h)


class _Fixed(nn.Module):
    """The parts no gate changes: the waveform normalisation (if the model has it), the positional
    conv and its residual add, the transformer's LayerNorm, post-norm's two LayerNorms per layer
    (they run whether or not the layer's blocks are kept), WavLM's position bias."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        D, eps = config.encoder_embed_dim, config.layer_norm_eps
        self.normalize = config.normalize_waveform
        self.pos_conv = ConvolutionalPositionalEmbedding(D, config.encoder_pos_conv_kernel,
                                                         config.encoder_pos_conv_groups)
        self.layer_norm = nn.LayerNorm(D, eps=eps)
        norms = 0 if config.encoder_layer_norm_first else 2 * config.encoder_num_layers
        self.norms = nn.ModuleList(nn.LayerNorm(D, eps=eps) for _ in range(norms))
        self.rel_pos_bias = RelativePositionBias(config.encoder_num_buckets, config.encoder_max_distance,
                                                 config.original_num_heads) if config.is_wavlm else None

    def forward(self, waveforms: Tensor, x: Tensor) -> Tensor:
        """waveforms: (batch, samples); x: (batch, frames, embed_dim) -> x's shape."""
        if self.normalize:
            normalize_waveforms(waveforms)
        x = self.layer_norm(x + self.pos_conv(x))
        if self.rel_pos_bias is not None:
            self.rel_pos_bias(x.shape[1])
        for norm in self.norms:
            x = norm(x)
        return x


def grid_sizes(table: Dict[str, Any]) -> Sequence[int]:
    """(conv points, projection points, head points, FFN points) of a table: for messages."""
    return (sum(len(c["in"]) * len(c["out"]) for c in table["conv"]), len(table["projection"]["channels"]),
            len(table["attention"]["heads"]), len(table["ffn"]["units"]))


def cpu_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of an encoder in eval mode (timing and probes leave the original where it is)."""
    copy = build_encoder(model.config)
    copy.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return copy.eval()


def table_latencies(table_path: str, models: Dict[str, nn.Module], repeats: int = 10, processes: int = 0
                    ) -> Dict[str, Any]:
    """A latency target's check (#18): each model's latency as the table predicts it and as measured
    under the table's conditions (its utterance length, batch, threads and clock; CPU copies,
    interleaved, the fastest of ``repeats``), in milliseconds.

    processes=0: timed here, in this process. processes=N: timed in N fresh processes one after
    another (``prune.latency_worker``; the models exported to a temporary folder), and each model's
    figure is the median over them of its time as a fraction of the first model's, times the
    median of the first model's time: the ratios to the first model are the medians of ratios
    (what a process's own state does to both cancels first). ``per_process_ms``: every process's
    figures. A worker that fails (one that cannot start, a broken environment) leaves a warning, the
    timing done here instead, ``processes`` 0 and ``fallback`` its error in the record."""
    table = load_table(table_path)
    clock = table.data.get("clock", "wall")
    fallback = None
    if processes > 0:
        try:
            per_process = _fresh_process_times(table_path, models, repeats, processes)
        except (RuntimeError, OSError, ValueError) as e:  # a worker that cannot start: time here, and say so
            fallback = str(e)
            warnings.warn(f"{e}; timing in this process instead", RuntimeWarning)
            processes = 0
    if processes > 0:
        first = next(iter(models))
        base = statistics.median(p[first] for p in per_process)
        measured = {name: base * statistics.median(p[name] / p[first] for p in per_process) for name in models}
    else:
        measured, per_process = time_here(table, {name: cpu_copy(m) for name, m in models.items()}, repeats), []
    return {"table": table_path, "seconds": table.seconds, "batch": table.batch, "threads": table.threads,
            "clock": clock, "allocator": allocator.steady(), "device": table.data["machine"].get("device", "cpu"),
            "processes": processes, **({"fallback": fallback} if fallback else {}),
            "predicted_ms": {name: 1e3 * table.latency(m.config) for name, m in models.items()},
            "measured_ms": {name: 1e3 * s for name, s in measured.items()},
            "per_process_ms": [{name: 1e3 * s for name, s in p.items()} for p in per_process]}


def time_here(table: LatencyTable, models: Dict[str, nn.Module], repeats: int) -> Dict[str, float]:
    """Seconds of each model's pass (fastest of ``repeats``, interleaved) in this process under the
    table's conditions: its utterance length, batch, clock and threads (restored after)."""
    x = torch.randn(table.batch, int(round(table.seconds * SAMPLE_RATE)))
    clock = CLOCKS.get(table.data.get("clock", "wall"), CLOCKS["wall"])
    threads = torch.get_num_threads()
    torch.set_num_threads(table.threads)
    try:
        with torch.no_grad():
            times = interleaved({name: (lambda m=m: m(x)) for name, m in models.items()}, repeats, clock=clock)
    finally:
        torch.set_num_threads(threads)
    return {name: fastest(t) for name, t in times.items()}


def _fresh_process_times(table_path: str, models: Dict[str, nn.Module], repeats: int, processes: int
                         ) -> List[Dict[str, float]]:
    """Seconds of each model (fastest of ``repeats``) in each of ``processes`` fresh processes."""
    from .checkpoints.export import export_pruned

    with tempfile.TemporaryDirectory(prefix="prune-timing-") as folder:
        for name, m in models.items():
            export_pruned(cpu_copy(m), Path(folder) / name)
        cmd = [sys.executable, "-m", "prune.latency_worker", str(table_path), folder, str(repeats), *models]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        out = []
        for _ in range(processes):
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"timing in a fresh process failed ({' '.join(cmd[:3])}): {tail}")
            out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out
