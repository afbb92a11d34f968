"""``raw``: the tensor stored as is (fp16, bf16-as-uint16, or fp32)."""
import numpy as np


def decode(params, arrays, shape, tables=None):
    data = arrays["data"]
    if params.get("dtype") == "bfloat16":
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32).reshape(shape)
