"""Regenerate tests/data/golden_torch.json from PyTorch's fake-quant kernels.

The golden values are computed by PyTorch, not by quantize_jax, so the test
that reads them checks our numerics against an independent implementation:

    pip install torch && python tools/make_golden.py
"""

import json
import pathlib

import numpy as np
import torch


def main():
    rng = np.random.default_rng(0)
    # Values that hit rounding ties (x / s = k + 0.5), the clipping edges, zero and negatives.
    scale = np.array([0.1, 0.25, 0.3, 1.7], np.float32)
    ties = (np.arange(-10, 10, dtype=np.float32) + 0.5)[None, :] * scale[:, None]
    noise = rng.normal(size=(4, 20)).astype(np.float32) * 4 * scale[:, None]
    x = np.concatenate([ties, noise, np.zeros((4, 1), np.float32)], axis=1)  # (4, 41), channel axis 0
    cases = []
    for qmin, qmax, zp in ((-8, 7, np.zeros(4, np.int32)), (0, 15, np.array([8, 3, 0, 15], np.int32))):
        y = torch.fake_quantize_per_channel_affine(
            torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(zp), 0, qmin, qmax
        ).numpy()
        yt = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), float(scale[1]), int(zp[1]), qmin, qmax).numpy()
        xt = torch.from_numpy(x).requires_grad_()
        torch.fake_quantize_per_channel_affine(
            xt, torch.from_numpy(scale), torch.from_numpy(zp), 0, qmin, qmax
        ).sum().backward()
        cases.append(
            {
                "qmin": qmin,
                "qmax": qmax,
                "zero_point": zp.tolist(),
                "per_channel": [v.hex() for v in y.astype(float).ravel()],
                "per_tensor": [v.hex() for v in yt.astype(float).ravel()],
                "grad_mask": xt.grad.numpy().ravel().tolist(),
            }
        )
    out = {
        "torch_version": torch.__version__,
        "shape": list(x.shape),
        "x": [v.hex() for v in x.astype(float).ravel()],
        "scale": [v.hex() for v in scale.astype(float)],
        "cases": cases,
    }
    path = pathlib.Path(__file__).parent.parent / "tests" / "data" / "golden_torch.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
