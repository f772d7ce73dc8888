"""Convolutions that are matrix products, trained as matrix products.

At the small inputs CPU runs use (28-64 px), a ResNet's last stages run on 2x2 and 1x1 feature
maps. There a convolution is exactly a matrix product — a 1x1 kernel at any map size (with its
stride as a subsampling), and any kernel whose output map is 1x1 (only the taps over real
pixels contribute) — but TensorFlow's convolution kernels, oneDNN's included, back-propagate
them far below the machine's peak. Measured on a 2-core AVX-512 host (forward + backward, batch
64, with batch norm): 1x1 conv 512 -> 2048 on a 1x1 map 34 ms as a convolution, 6 ms as a
matrix product; 1x1 stride-2 conv 1024 -> 2048 on a 2x2 map 73 vs 14 ms; on 4x4 and larger
maps both ways are equal. ResNet50's 1x1-map stage took about half its train step at 32 px.

`matmul_view(graph)` returns the same functional graph with every such `Conv2D` computed by a
`MatmulConv` that shares the convolution's variables (every other layer is shared as it is):
training the view trains the original model, and what is saved and exported stays the plain
model with plain `Conv2D` layers.
The Distiller trains through these views; convolutions that are not matrix products run as
they are.
"""

from __future__ import annotations

import keras
from keras import ops

from kd_keras import compat
from kd_keras.models.taps import VIEW_NODES, all_layers


def matmul_plan(conv: keras.layers.Conv2D, shape) -> tuple | None:
    """How `conv` on inputs of static `shape` (batch, h, w, c) is a matrix product:
    `("pointwise", stride_h, stride_w)` for a 1x1 kernel, `("window", rows, cols, kernel_rows,
    kernel_cols)` (slices) when the output map is 1x1, None when it is not a plain product."""
    if type(conv) is not keras.layers.Conv2D or conv.data_format != "channels_last":
        return None
    if tuple(conv.dilation_rate) != (1, 1) or conv.groups != 1:
        return None
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[2], int):
        return None
    kh, kw = conv.kernel_size
    sh, sw = conv.strides
    if (kh, kw) == (1, 1):
        return ("pointwise", sh, sw)
    spans = []
    for size, k, s in ((shape[1], kh, sh), (shape[2], kw, sw)):
        if conv.padding == "same":
            out, pad_before = -(-size // s), max(k - size, 0) // 2
        else:
            out, pad_before = (size - k) // s + 1, 0
        if out != 1:
            return None
        # the one output pixel sees input rows [-pad_before, k - pad_before): the real ones
        # are [0, min(size, k - pad_before)), kernel rows from pad_before
        real = min(size, k - pad_before)
        spans.append((slice(0, real), slice(pad_before, pad_before + real)))
    (rows, krows), (cols, kcols) = spans
    return ("window", rows, cols, krows, kcols)


class MatmulConv(keras.layers.Layer):
    """A `Conv2D` computed as a matrix product where that is exact (see `matmul_plan`), with
    the convolution's own variables: a training view, never saved.

    Args:
        conv: the `keras.layers.Conv2D` to compute (its kernel, bias and activation).
    """

    def __init__(self, conv: keras.layers.Conv2D, **kwargs):
        if type(conv) is not keras.layers.Conv2D:
            raise ValueError(f"conv must be a keras.layers.Conv2D, got {type(conv).__name__}")
        super().__init__(name=conv.name, dtype=conv.dtype_policy, **kwargs)
        self.conv = conv

    def call(self, inputs):
        plan = matmul_plan(self.conv, tuple(inputs.shape))
        if plan is None:  # a conv shared at another size: the convolution itself
            return self.conv.call(inputs)
        kernel = self.conv.kernel
        c_in, c_out = kernel.shape[2], kernel.shape[3]
        if plan[0] == "pointwise":
            _, sh, sw = plan
            x = inputs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else inputs
            y = ops.matmul(x, ops.reshape(kernel, (c_in, c_out)))
        else:
            _, rows, cols, krows, kcols = plan
            x = inputs[:, rows, cols, :]
            n = x.shape[1] * x.shape[2] * c_in
            w = ops.reshape(kernel[krows, kcols, :, :], (n, c_out))
            y = ops.reshape(ops.matmul(ops.reshape(x, (-1, n)), w), (-1, 1, 1, c_out))
        if self.conv.use_bias:
            y = y + self.conv.bias
        return self.conv.activation(y) if self.conv.activation is not None else y

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):  # a view of a layer of another model: rebuilt by matmul_view
        raise NotImplementedError("MatmulConv is a training view and is never serialised")


def _is_plain_conv(layer) -> bool:
    return type(layer) is keras.layers.Conv2D


def _is_matmul(layer) -> bool:
    """A plain Conv2D that is a matrix product at the input size it was built for, or may be
    one (a backbone built for any image size: its view decides per call)."""
    if not _is_plain_conv(layer) or len(compat.inbound_nodes(layer)) != 1:
        return False
    shape = tuple(layer.input.shape)
    return None in shape[1:3] or matmul_plan(layer, shape) is not None


def matmul_view(model: keras.Model | None) -> keras.Model | None:
    """`model` (a functional graph) with every plain `Conv2D` that is (or, built for any
    size, may be) a matrix product computed by a `MatmulConv` sharing its variables, nested
    functional models included; every other layer is the model's own (shared). A model
    without such layers, or one Keras cannot re-trace (subclassed models), is returned as it
    is."""
    if model is None:
        return model
    layers = all_layers(model)
    if not any(_is_matmul(layer) for layer in layers):
        return model
    before = {id(layer): len(compat.inbound_nodes(layer)) for layer in layers}

    def share(layer):
        return MatmulConv(layer) if _is_matmul(layer) else layer

    try:
        view = keras.models.clone_model(model, clone_function=share, recursive=True)
    except ValueError:  # Keras clones only functional and sequential graphs
        return model
    for layer in layers:
        VIEW_NODES.update(compat.inbound_nodes(layer)[before[id(layer)] :])
    return view
