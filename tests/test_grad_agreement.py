"""benchmarks/grad_agreement.py: the gradients the compiled step hands its optimizer, against autograd's (CPU smoke)."""

import importlib.util
import json
import os

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "grad_agreement.py")
spec = importlib.util.spec_from_file_location("grad_agreement", _PATH)
ga = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ga)


def test_smoke_finds_every_gradient_within_bf16_error_and_flags_a_wrong_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ga.json"
    assert ga.main(["--smoke", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["missing"] == [] and doc["unexpected"] == []
    assert len(doc["params"]) > 20
    assert max(r["ratio"] for r in doc["params"]) < 2.0  # ours within bf16's own error of the fp32 truth
    assert "gradients missing in ours: 0" in capsys.readouterr().out

    # negative control: one gradient the optimizer receives doubled, one dropped
    orig = ga._our_grads

    def corrupt(*a, **k):
        loss, grads, info = orig(*a, **k)
        grads["model.layers.0.mlp.up_proj.weight"] = grads["model.layers.0.mlp.up_proj.weight"] * 2
        del grads["model.norm.weight"]
        return loss, grads, info

    monkeypatch.setattr(ga, "_our_grads", corrupt)
    assert ga.main(["--smoke", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["missing"] == ["model.norm.weight"]
    worst = doc["params"][0]
    assert worst["param"] == "model.norm.weight" and worst["ratio"] == float("inf")
    assert doc["params"][1]["param"] == "model.layers.0.mlp.up_proj.weight" and doc["params"][1]["ratio"] > 50
    assert "model.norm.weight" in capsys.readouterr().out.split("missing:")[-1]
