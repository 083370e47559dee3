"""`dinor1 export onnx`: the detection graph of a tiny model exported with torch's dynamo
exporter and run by onnxruntime on CPU gives PyTorch's scores and boxes."""

import pytest

from dinor1.cli import main
from tests.helpers import tiny_model


@pytest.mark.slow
def test_onnx_export_matches_pytorch(tmp_path, capsys):
    tiny_model(tmp_path / "model")
    out = tmp_path / "detector.onnx"
    assert main(["export", "onnx", str(tmp_path / "model"), "--out", str(out), "--height", "64",
                 "--width", "96", "--prompts", "3"]) == 0
    printed = capsys.readouterr().out
    difference = float(printed.rsplit("max |difference| ", 1)[1].split()[0])
    assert out.is_file() and difference < 1e-4, printed
    assert "prompts [1, 3, " in printed
