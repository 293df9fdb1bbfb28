"""Where a network's inference runs: torch (fp32 or bf16, see :mod:`dfsnet.precision`), or ONNX
Runtime (fp32, CPU).

On this project's CPU, EfficientNet-Lite0 exported with torch's ONNX exporter runs about 6x
faster in ONNX Runtime than in torch fp32 eager and 2-2.4x faster than torch bf16 +
channels_last, with fp32's numbers (``benchmarks/bench_extract.py``). An index therefore keeps
its network's ``features()`` as an ONNX graph beside the checkpoint, and searching it needs
neither torch nor timm (start-up in well under two seconds).

``runtime="auto"`` means ONNX Runtime on a CPU when it is installed and bf16 was not asked for
explicitly, torch otherwise (a CUDA device, ``precision="bf16"``, or no onnxruntime). The
environment variable ``DFSNET_RUNTIME=torch`` makes "auto" mean torch everywhere (to compare, or
where exporting is unwanted: the test suite sets it, and tests ONNX Runtime by name).
Exporting needs torch and ``onnxscript``; running needs only ``onnxruntime`` and numpy: this
module imports neither torch nor onnxruntime at the top.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dfsnet.errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = ["RUNTIMES", "DEFAULT_RUNTIME", "OnnxFeatures", "onnx_available", "resolve_runtime",
           "export_features", "effective_runtime"]

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx")
DEFAULT_RUNTIME = "auto"
INPUT_NAME = "images"
OUTPUT_NAME = "features"
# ONNX Runtime and torch fp32 agree to about 1e-6 on real networks; far more is a broken export.
PARITY_TOLERANCE = 1e-3


def onnx_available(*, export: bool = False) -> bool:
    """Whether ONNX Runtime is installed (and, with ``export``, the exporter's ``onnxscript``)."""
    names = ("onnxruntime", "onnxscript") if export else ("onnxruntime",)
    return all(importlib.util.find_spec(n) is not None for n in names)


def effective_runtime(runtime: str) -> str:
    """``runtime`` with "auto" read as the ``DFSNET_RUNTIME`` environment variable says ("torch" or "auto").

    Raises
    ------
    InputError
        An unknown name, in ``runtime`` or in the variable.
    """
    if runtime not in RUNTIMES:
        raise InputError(f"runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}")
    env = os.environ.get("DFSNET_RUNTIME", "auto")
    if env not in ("auto", "torch"):
        raise InputError(f"DFSNET_RUNTIME: expected auto or torch, got {env!r}")
    return "torch" if runtime == "auto" and env == "torch" else runtime


def resolve_runtime(runtime: str = DEFAULT_RUNTIME, *, device_type: str = "cpu", precision: str = "auto",
                    export: bool = False) -> str:
    """The runtime ``runtime`` means here: ``"torch"`` or ``"onnx"``.

    Parameters
    ----------
    runtime : {"auto", "torch", "onnx"}
    device_type : str
        The device the work would run on in torch ("cpu", "cuda", ...).
    precision : {"auto", "fp32", "bf16"}
        The precision asked for; ONNX Runtime runs fp32, so an explicit "bf16" means torch.
    export : bool
        The ONNX graph still has to be exported (needs ``onnxscript`` too).

    Raises
    ------
    InputError
        An unknown name, or ``"onnx"`` where it cannot run (not a CPU, bf16 asked for, or the
        packages missing).
    """
    runtime = effective_runtime(runtime)
    if runtime == "torch":
        return "torch"
    available = onnx_available(export=export)
    if runtime == "onnx":
        if device_type != "cpu":
            raise InputError(f"runtime: onnx runs on the CPU, but the device is {device_type}; "
                             "use runtime torch (--runtime torch) there")
        if precision == "bf16":
            raise InputError("runtime: onnx runs fp32, but precision bf16 was asked for; use precision "
                             "auto or fp32 with it, or runtime torch for bf16")
        if not available:
            raise InputError("runtime: onnx needs the onnxruntime" + (" and onnxscript packages" if export
                             else " package") + " (pip install onnxruntime onnxscript)")
        return "onnx"
    return "onnx" if device_type == "cpu" and precision != "bf16" and available else "torch"


def _features_module(model, maps: bool):
    """``model.features`` (or, with ``maps``, ``model`` itself) as a module's forward, which is what
    the exporter traces."""
    import torch

    class FeaturesOf(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return (self.inner(x) if maps else self.inner.features(x)).float()

    return FeaturesOf(model)


def export_features(model: torch.nn.Module, input_shape: tuple[int, int, int], *, maps: bool = False,
                    check: bool = True) -> bytes:
    """``model.features`` as a serialised ONNX graph, fp32, with a dynamic batch dimension.

    The model is traced on a CPU copy in eval mode and fp32; ``model`` itself is not changed.

    Parameters
    ----------
    model : torch.nn.Module
        Anything with ``features(x float (N, 3, H, W)) -> float (N, D)``.
    input_shape : (3, H, W)
        The normalised image size the graph takes.
    maps : bool
        Export ``model``'s own forward instead, e.g. a backbone's ``(N, 3, H, W) -> (N, C, h, w)``
        feature maps (for :func:`dfsnet.features.cached_feature_maps`).
    check : bool
        Run a probe batch through torch and ONNX Runtime and refuse a graph whose features
        differ by more than 1e-3 (relative to their scale).

    Returns
    -------
    bytes
        The ONNX model, weights included.

    Raises
    ------
    RuntimeError
        The exporter failed, or the graph does not reproduce the model.
    """
    import copy
    import io
    import warnings

    import torch

    c, h, w = (int(v) for v in input_shape)
    module = _features_module(copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval(),
                              maps)
    probe = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    # The exporter narrates each pass on stdout and warns about internals; neither is the user's business.
    # Tracing needs autograd's bookkeeping, which a caller's inference_mode would switch off.
    with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.inference_mode(False),
          _quiet_loggers("onnxscript", "onnx_ir", "torch.onnx", "torch.export")):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, (probe,), dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes={"x": {0: batch}},
                                        verbose=False, optimize=True)
        except Exception as exc:  # the exporter raises many types; the caller falls back to torch
            raise RuntimeError(f"model: the ONNX export failed: {_first_line(exc)}") from exc
    data = program.model_proto.SerializeToString()
    if check:
        with torch.inference_mode():
            want = module(probe).numpy()
        got = OnnxFeatures(data, threads=1)(probe.numpy())
        error = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
        if not error <= PARITY_TOLERANCE:
            raise RuntimeError(f"model: the ONNX graph's features differ from torch's by {error:.2e} "
                               f"(relative; at most {PARITY_TOLERANCE} expected)")
        logger.debug("onnx export: relative difference to torch fp32 %.2e", error)
    return data


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """The exporter's libraries log every optimisation pass at INFO; keep only their warnings."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _first_line(exc: BaseException) -> str:
    """The root cause of an exporter error on one line: its reports are pages long, in ANSI colours."""
    import re

    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no detail'}"


class OnnxFeatures:
    """A network's ``features()`` (or a backbone's feature maps) run by ONNX Runtime on the CPU (fp32).

    Parameters
    ----------
    model : bytes or path-like
        A graph from :func:`export_features` (its bytes, or a file holding them).
    threads : int, optional
        Intra-op threads; default: ``torch.get_num_threads()``'s convention, i.e. the
        ``OMP_NUM_THREADS`` environment variable when set, else ONNX Runtime's own choice
        (one per physical core).

    Attributes
    ----------
    input_shape : tuple of int
        (3, H, W), the normalised image size the graph takes.
    output_shape : tuple of int
        (D,) for features, (C, h, w) for feature maps: an output row's shape.
    feature_dim : int
        ``output_shape[0]``.

    Raises
    ------
    InputError
        The file is not an ONNX graph of the expected form.
    """

    def __init__(self, model, *, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
            threads = int(os.environ["OMP_NUM_THREADS"])
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle intra-op threads yield instead of spinning: the image decoding that feeds the graph
        # (DataLoader workers, the server's decoding threads) runs on the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source = model if isinstance(model, bytes) else str(Path(model))
        try:
            self._session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own unrelated types for bad files
            where = "model" if isinstance(model, bytes) else str(model)
            raise InputError(f"{where}: not a loadable ONNX graph ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        shape = inputs[0].shape if len(inputs) == 1 else None
        out = outputs[0].shape if len(outputs) == 1 else None
        if (shape is None or len(shape) != 4 or not all(isinstance(s, int) for s in shape[1:])
                or out is None or len(out) not in (2, 4) or not all(isinstance(s, int) for s in out[1:])):
            raise InputError(f"model: expected an ONNX graph from (N, 3, H, W) images to (N, D) features or "
                             f"(N, C, h, w) maps, found inputs {[i.shape for i in inputs]} and outputs "
                             f"{[o.shape for o in outputs]}")
        self._input = inputs[0].name
        self.input_shape = tuple(int(s) for s in shape[1:])
        self.output_shape = tuple(int(s) for s in out[1:])
        self.feature_dim = self.output_shape[0]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features of a batch.

        Parameters
        ----------
        images : ndarray of float32, shape (N, 3, H, W)
            Normalised as the network expects; (3, H, W) must equal ``input_shape``.

        Returns
        -------
        ndarray of float32, shape (N, *output_shape)
        """
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != self.input_shape:
            raise InputError(f"images: expected shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {images.shape}")
        return self._session.run(None, {self._input: images})[0]
