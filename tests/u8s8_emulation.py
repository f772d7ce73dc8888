"""The integer arithmetic of x86 CPUs without VNNI, emulated for ONNX INT8 files.

ONNX Runtime's U8S8 kernels on AVX2 (and AVX-512 without VNNI) multiply uint8 activations by
int8 weights with VPMADDUBSW, which adds each pair of products (k = 2i, 2i + 1) in a
*saturating* int16, then adds the pairs in int32 (VPMADDWD). VNNI (VPDPBUSD) accumulates in
int32 directly. ONNX Runtime has no switch to force its non-VNNI kernels on a VNNI host, so
this runs a file with onnx's reference evaluator, its `MatMulInteger` replaced by that
arithmetic (zero points corrected exactly). It covers graphs whose integer products are
`MatMulInteger` nodes (dynamic quantization: ViT, DeiT); static QDQ files compute in
QLinearConv only after ONNX Runtime fuses them, which the reference evaluator does not do.

Checked against a real AVX2-only host (AMD EPYC Zen 1): the tiny ViT of
`test_vit_student_exports_gelu_and_quantizes_dynamically` with 8-bit weights agreed with Keras
on 0.83 of 64 images there, and 0.828 (53/64) under this emulation.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun


class MatMulInteger(OpRun):
    """`MatMulInteger` as VPMADDUBSW + VPMADDWD compute it (counts saturated pair sums)."""

    op_domain = ""
    saturated = 0
    pairs = 0

    def _run(self, a, b, a_zero_point=None, b_zero_point=None):
        a32, b32 = a.astype(np.int32), b.astype(np.int32)
        k = a32.shape[-1]
        if k % 2:
            a32 = np.concatenate([a32, np.zeros((*a32.shape[:-1], 1), np.int32)], -1)
            b32 = np.concatenate([b32, np.zeros((1, *b32.shape[1:]), np.int32)], 0)
        pair = a32[..., 0::2, None] * b32[0::2] + a32[..., 1::2, None] * b32[1::2]
        clipped = np.clip(pair, -(2**15), 2**15 - 1)
        MatMulInteger.saturated += int((clipped != pair).sum())
        MatMulInteger.pairs += pair.size
        za = 0 if a_zero_point is None else np.int32(a_zero_point)
        zb = 0 if b_zero_point is None else np.asarray(b_zero_point, np.int32)
        out = (clipped.sum(-2) - za * b.astype(np.int32).sum(0)
               - zb * a.astype(np.int32).sum(-1, keepdims=True) + k * za * zb)  # fmt: skip
        return (out.astype(np.int32),)


def logits(path, images: np.ndarray, without_vnni: bool, batch: int = 16) -> np.ndarray:
    """The file's logits in onnx's reference evaluator: exact int32 products (as VNNI), or
    with `without_vnni` the saturating int16 pair sums of AVX2 / AVX-512 without VNNI."""
    evaluator = ReferenceEvaluator(onnx.load(str(path)),
                                   new_ops=[MatMulInteger] if without_vnni else None)  # fmt: skip
    return np.concatenate([evaluator.run(["logits"], {"images": images[i : i + batch]})[0]
                           for i in range(0, len(images), batch)])  # fmt: skip
