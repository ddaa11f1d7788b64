"""The local model with int8 matrix products: ONNX Runtime's dynamic quantization, built once per host.

The bundled file stores int8 weights but computes in fp32 (its weights are dequantized when
the session loads). This builds a variant whose weight matrices multiply as int8
(MatMulInteger, VNNI instructions where the CPU has them), with ONNX Runtime's own tools:

1. the session's basic optimizations fold the dequantization into fp32 weights,
2. ``onnxruntime.transformers`` fuses the BERT graph (bias + GELU, residual + LayerNorm),
3. ``onnxruntime.quantization.quantize_dynamic`` quantizes each weight matrix per channel,
   except the feed-forward output projections: their inputs (GELU outputs) have outliers
   that one activation scale per tensor cannot hold. Measured on 24 reference texts against
   sentence-transformers: all matrices int8 gave 0.987 minimum cosine, these kept in fp32
   0.993 (BENCHMARKS.md, "Embedding backends").

The result lands in ``cache_dir`` under a name that carries the source file's sha256, the
recipe's version and ONNX Runtime's version, so another model or runtime builds its own.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

RECIPE_VERSION = 1
HEADS = 12
HIDDEN = 384


def int8_model_path(source: Path, cache_dir: Path) -> Path:
    """The int8 variant of ``source``, built into ``cache_dir`` unless it is there; blocking (seconds)."""
    import onnxruntime as ort

    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = cache_dir / f"{source.stem}-{digest}-int8-r{RECIPE_VERSION}-ort{ort.__version__}.onnx"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".building-") as work:
        folded, fused, quantized = (Path(work) / name for name in ("folded.onnx", "fused.onnx", "int8.onnx"))
        _fold_weights(source, folded)
        _fuse(folded, fused)
        _quantize(fused, quantized)
        # Whole or not at all: two processes building at once each rename a complete file.
        os.replace(quantized, target)
    return target


def _fold_weights(source: Path, target: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])


def _fuse(source: Path, target: Path) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    # opt_level 0: the Python fusions only (level 1 would import PyTorch to check its version).
    optimize_model(str(source), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN, opt_level=0).save_model_to_file(
        str(target)
    )


def _quantize(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    shapes = {weight.name: tuple(weight.dims) for weight in model.graph.initializer}
    # Feed-forward output projections: (intermediate, hidden) weights, 1536 x 384 in MiniLM.
    kept_fp32 = [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and any(len(shapes.get(name, ())) == 2 and shapes[name][0] > shapes[name][1] for name in node.input)
    ]
    quantize_dynamic(
        str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=kept_fp32
    )
