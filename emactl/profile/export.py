"""The exported network under onnxruntime against eager PyTorch: same inputs, same threads.

EMANet (``--backbone``, ``--channels``, ``--bases``, ``--iters``; random weights, which do not
change the cost) is exported to ONNX as ``emactl export`` does (:func:`emactl.export.export_network`:
BN folded, EM iterations fixed) at ``--crop``², then both are timed in interleaved rounds on
one batch of the same normalised images; onnxruntime gets as many intra-op threads as torch.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console

from ..config import EMAConfig, ModelConfig
from ..export import OnnxModel, compare, export_network, require_onnx, write_onnx
from ..nn.emanet import build_model
from .timing import measure_many

RUNTIMES = ("eager PyTorch", "onnxruntime")


def profile_export(backbone: str, crop: int, batch: int, channels: int, bases: int, iters: int, classes: int,
                   repeats: int, console: Console) -> pd.DataFrame:
    """Latency of one forward over ``batch`` crops of ``crop``² pixels, per runtime."""
    require_onnx()
    cfg = ModelConfig(backbone=backbone, pretrained=None, head_channels=channels, mid_channels=max(channels // 2, 1),
                      ema=EMAConfig(bases=bases, iters=iters))
    torch.manual_seed(0)
    model = build_model(cfg, classes).eval()
    x = torch.randn(batch, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on recorded Python ints
        path = Path(folder) / "model.onnx"
        write_onnx(export_network(model, None), x, path, dynamic=False, meta={})
        session = OnnxModel(path, threads=threads)

        def eager() -> torch.Tensor:
            with torch.inference_mode():
                return model(x)["out"]

        with console.status(f"[bold]export[/bold]: timing {backbone} at {crop}x{crop}, batch {batch}"):
            timings = measure_many({"eager PyTorch": eager, "onnxruntime": lambda: session(x)}, torch.device("cpu"),
                                   rounds=repeats)
        mask, err = compare(session(x), eager())
    eager_ms = timings["eager PyTorch"].ms
    rows = [
        {"runtime": name, "threads": threads, "latency ms": timings[name].ms, "IQR ms": timings[name].iqr * 1e3,
         "vs eager": eager_ms / timings[name].ms, "mask agreement %": 100.0 if name == RUNTIMES[0] else 100 * mask,
         "max rel. logit error": 0.0 if name == RUNTIMES[0] else err}
        for name in RUNTIMES
    ]
    return pd.DataFrame(rows)
