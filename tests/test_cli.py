import subprocess
import sys

import numpy as np
import pytest

import quantize_jax as qj
from quantize_jax.cli import main


@pytest.fixture
def weights(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"fc.weight": rng.normal(size=(64, 256)).astype(np.float32), "fc.bias": np.zeros(64, np.float32),
               "positions": np.array([2**40, 7], np.int64)}
    from safetensors.numpy import save_file

    path = tmp_path / "in.safetensors"
    save_file(tensors, path)
    np.savez(tmp_path / "in.npz", **tensors)
    return tmp_path, tensors


@pytest.mark.parametrize("suffix", ["safetensors", "npz"])
def test_quantize_then_inspect(weights, capsys, suffix):
    tmp, tensors = weights
    out = tmp / "out.safetensors"
    rc = main(["quantize", str(tmp / f"in.{suffix}"), str(out), "--format", "nf4", "--group-size", "64",
               "--axis", "1", "--method", "mse", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fc.weight" in printed and "total: 1 of 3 leaves quantized" in printed
    tree = qj.load(out)
    q = tree["fc.weight"]
    assert q.spec == qj.QuantSpec(format="nf4", axis=1, group_size=64, method="mse") and q.shape == (64, 256)
    np.testing.assert_array_equal(tree["fc.bias"], tensors["fc.bias"])
    assert tree["positions"].dtype == np.int64 and tree["positions"].tolist() == [2**40, 7]  # left as it was
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "checksum OK" in text and "qarray" in text and "nf4" in text


@pytest.mark.parametrize("axis, group, expect", [("0", None, (0, 1, 2)), ("0", "32", 2), ("1", None, (1, 2, 3)),
                                                ("1", "32", 1)])
def test_convolution_kernels_keep_one_scale_per_output_channel(tmp_path, capsys, axis, group, expect):
    """--axis 0 alone reduced only a conv kernel's first spatial axis: more bytes of scales than of codes."""
    kernel = np.random.default_rng(1).normal(size=(3, 3, 64, 96) if axis == "0" else (96, 64, 3, 3))
    np.savez(tmp_path / "conv.npz", conv=kernel.astype(np.float32))
    args = ["quantize", str(tmp_path / "conv.npz"), str(tmp_path / "o.safetensors"), "--axis", axis, "--quiet"]
    assert main(args + (["--group-size", group] if group else [])) == 0
    q = qj.load(tmp_path / "o.safetensors")["conv"]
    assert q.spec.axis == expect and q.shape == kernel.shape
    assert q.scale.nbytes <= q.packed.nbytes / (4 if group else 50)  # 1 bit of scale per value with groups of 32
    np.testing.assert_allclose(qj.dequantize(q), kernel, atol=0.5 * np.abs(kernel).max() / 7)


def test_errors_are_one_line_with_nonzero_status(weights, capsys):
    tmp, tensors = weights
    assert main(["quantize", str(tmp / "missing.npz"), str(tmp / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quantize-jax quantize: error: no such file" in err
    bad = dict(tensors)
    bad["fc.weight"] = bad["fc.weight"].copy()
    bad["fc.weight"][0, 0] = np.nan
    np.savez(tmp / "nan.npz", **bad)
    assert main(["quantize", str(tmp / "nan.npz"), str(tmp / "o.safetensors"), "--quiet"]) == 1
    assert "leaf 'fc.weight' of shape (64, 256) holds NaN or Inf" in capsys.readouterr().err
    (tmp / "junk.safetensors").write_bytes(b"not a file")
    assert main(["quantize", str(tmp / "junk.safetensors"), str(tmp / "o.safetensors")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["inspect", str(tmp / "in.safetensors")]) == 1
    assert "not a quantize_jax checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "a", "b", "--format", "int3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'int3'" in err


def test_inspect_reports_an_altered_file(weights, capsys):
    tmp, _ = weights
    out = tmp / "out.safetensors"
    assert main(["quantize", str(tmp / "in.npz"), str(out), "--quiet"]) == 0
    data = bytearray(out.read_bytes())
    data[-1] ^= 1
    out.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_console_entry_point_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "quantize_jax", "inspect", "/nonexistent.safetensors"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "no such file" in proc.stderr
