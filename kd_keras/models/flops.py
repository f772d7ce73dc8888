"""How much arithmetic a model needs, and how fast this machine can do it.

- `onnx_flops`: floating-point operations of one forward pass at batch 1, counted from an FP32
  ONNX graph: 2 x the multiply-accumulates of every Conv, MatMul and Gemm node
  (shapes from ONNX shape inference with the batch dimension fixed to 1). Element-wise ops,
  normalisation, pooling and softmax are not counted: in CNNs and ViTs they are a few percent.
- `matmul_peak`: the machine's practical float32 peak, measured in the same process and with the
  same thread count as the benchmark rows by timing a square float32 matrix product in ONNX
  Runtime on the CPU (its MLAS GEMM, the kernel ONNX Runtime's convolutions use). The fastest of
  the timed calls counts: a peak is what the machine *can* do.

A row's *compute bound* is FLOPs / peak: no implementation of the model can be faster on this
CPU at that thread count; FP32 latency / compute bound says how far from it a runtime is.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

FLOPS_METHOD = (
    "2 x multiply-accumulates of Conv/MatMul/Gemm nodes of the FP32 ONNX graph at "
    "batch 1 (ONNX shape inference); element-wise ops, pooling and softmax not counted"
)
PEAK_METHOD = "fastest timed float32 {n}x{n} MatMul in ONNX Runtime (CPU, same threads)"


def _dims(value) -> list[int | None]:
    return [
        d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
    ]


def _prod(dims: list[int | None]) -> int | None:
    return None if any(d is None for d in dims) else int(np.prod(dims, dtype="int64"))


def _node_macs(node, shapes: dict[str, list[int | None]]) -> int | None:
    """Multiply-accumulates of one Conv / MatMul / Gemm node (None: shapes unknown)."""
    out = _prod(shapes.get(node.output[0], [None]))
    if node.op_type == "Conv":  # weight [C_out, C_in / groups, k_h, k_w]
        per_output = _prod(shapes.get(node.input[1], [None])[1:])
    else:  # A [..., M, K] @ B [..., K, N]; Gemm may transpose A
        a = shapes.get(node.input[0], [None])
        trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
        per_output = a[-2] if node.op_type == "Gemm" and trans_a else a[-1]
    return None if out is None or per_output is None else out * per_output


def _run_shapes(model, names: list[str]) -> dict[str, list[int]]:
    """Shapes of tensors `names`, from one ONNX Runtime run of `model` on zeros at batch 1."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    probe = type(model)()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(names):
        if name not in known:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in value.shape]
        feed[value.name] = np.zeros(shape, "float32")
    outputs = session.run(None, feed)
    return {o.name: list(v.shape) for o, v in zip(session.get_outputs(), outputs, strict=True)}


def onnx_flops(path: str | os.PathLike) -> dict[str, Any]:
    """FLOPs at batch 1 of an ONNX file (see module docstring): `flops` and the number of
    compute nodes whose shapes could not be inferred (`uncounted`, 0 when the count is whole)."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: _dims(v) for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    shapes.update({t.name: list(t.dims) for t in inferred.initializer})
    nodes = [n for n in inferred.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    unknown = [n for n in nodes if _node_macs(n, shapes) is None]
    if unknown:  # ONNX shape inference gives up after tf2onnx's reshapes (ViT): run it once
        shapes.update(_run_shapes(model, [t for n in unknown for t in (n.input[0], n.output[0])]))
    counted = [_node_macs(n, shapes) for n in nodes]
    macs = sum(m for m in counted if m is not None)
    uncounted = sum(m is None for m in counted)
    return {"flops": int(2 * macs), "uncounted": uncounted}


def matmul_peak(threads: int, n: int = 1024, seconds: float = 1.0) -> dict[str, Any]:
    """Practical float32 peak (GFLOP/s) of this CPU with `threads` ONNX Runtime threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.standard_normal((n, n)).astype("float32"), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "peak",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])], [b],
    )  # fmt: skip
    # IR version 8 (opset 17's): onnx 1.23 writes a newer IR than ONNX Runtime 1.31 reads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    a = rng.standard_normal((n, n)).astype("float32")
    for _ in range(3):
        session.run(None, {"a": a})
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        session.run(None, {"a": a})
        times.append(time.perf_counter() - t)
    gflops = 2 * n**3 / min(times) / 1e9
    return {
        "gflops": round(gflops, 1),
        "threads": threads,
        "n": n,
        "calls": len(times),
        "method": PEAK_METHOD.format(n=n),
    }


TRAIN_FLOPS_METHOD = (
    "3 x the forward FLOPs of the trained model (forward, gradient of the activations, gradient "
    "of the weights) plus 1 x the frozen teacher's forward FLOPs; forward FLOPs = those of the "
    "Conv2D / MatMul / BatchMatMul / depthwise nodes of the model's traced inference graph "
    "(TensorFlow's profiler, padded taps included, as for the ONNX count), element-wise ops "
    "and the optimizer update not counted"
)
_COMPUTE_OPS = ["Conv2D.*", "Conv3D.*", "MatMul.*", "BatchMatMul.*", "Depthwise.*", "Einsum"]


def graph_flops(graph) -> int:
    """FLOPs of the compute nodes (convolutions and matrix products) of a traced TensorFlow
    graph, from TensorFlow's profiler (shapes must be static)."""
    import tensorflow as tf

    profiler = tf.compat.v1.profiler
    options = profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    options["account_type_regexes"] = _COMPUTE_OPS
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # the v1 profiler warns about its own deprecated helpers
    try:
        return int(profiler.profile(graph, options=options).total_float_ops)
    finally:
        logger.setLevel(level)


def forward_flops(model, x) -> int:
    """FLOPs of one inference forward pass of `model` on the batch `x` (traced, not run)."""
    import tensorflow as tf

    forward = tf.function(lambda images: model(images, training=False))
    return graph_flops(forward.get_concrete_function(tf.constant(x)).graph)


def train_step_flops(trained, x, teacher=None) -> int:
    """FLOPs of one train step of `trained` on the batch `x` with an optional frozen
    `teacher` in the step (see `TRAIN_FLOPS_METHOD`)."""
    flops = 3 * forward_flops(trained, x)
    return flops + (forward_flops(teacher, x) if teacher is not None else 0)
