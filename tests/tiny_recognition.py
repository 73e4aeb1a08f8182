"""A tiny insightface-format face-recognition ONNX file (the interface of buffalo_l's w600k_r50.onnx).

Input `input.1` [N, 3, 112, 112] (an aligned face crop, normalised as (x - 127.5) / 127.5 by the caller, or by
the graph itself when it begins with Sub/Mul nodes like some published files), output [N, 512]: a fixed random
projection of the crop's 8x8-pooled pixels. Not a trained recogniser, but a function of the aligned face: the
same crop gives the same embedding, different faces give different ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tiny_insightface import _save

CROP = 112
EMBEDDING = 512
POOL = 8


def write_recognition_model(path: Path, seed: int = 0, normalises_input: bool = False,
                            fixed_batch: bool = False) -> Path:
    """Write the model. `normalises_input`: the graph computes (x - 127.5) / 127.5 itself (expects 0-255
    pixels). `fixed_batch`: the input's batch dimension is 1, as in some exported files."""
    from onnx import TensorProto, helper, numpy_helper

    pooled = 3 * (CROP // POOL) ** 2
    weight = np.random.default_rng(seed).standard_normal((pooled, EMBEDDING)).astype(np.float32) / np.sqrt(pooled)
    initializers = [numpy_helper.from_array(weight, "weight"),
                    numpy_helper.from_array(np.zeros(EMBEDDING, np.float32), "bias")]
    nodes, source = [], "input.1"
    if normalises_input:
        initializers += [numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
                         numpy_helper.from_array(np.array(1 / 127.5, np.float32), "inverse_std")]
        nodes += [helper.make_node("Sub", ["input.1", "mean"], ["centred"], name="Sub_0"),
                  helper.make_node("Mul", ["centred", "inverse_std"], ["normalised"], name="Mul_1")]
        source = "normalised"
    nodes += [helper.make_node("AveragePool", [source], ["pooled"], kernel_shape=[POOL, POOL], strides=[POOL, POOL],
                               name="AveragePool_2"),
              helper.make_node("Flatten", ["pooled"], ["flat"], name="Flatten_3"),
              helper.make_node("Gemm", ["flat", "weight", "bias"], ["683"], name="Gemm_4")]
    batch = 1 if fixed_batch else "None"
    graph = helper.make_graph(
        nodes, "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, CROP, CROP])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [batch, EMBEDDING])], initializers)
    return _save(graph, path)
