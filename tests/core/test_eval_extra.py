"""``data.eval_extra``: more held-out sets, each measured at every stage and gated like eval."""

from __future__ import annotations

import json

import numpy as np

from compress.data import builtin

RECIPE = """\
version: 1
model:
  factory: compress.zoo:digits_mlp
  kwargs: {{hidden: [32]}}
  input_shape: [1, 64]
data:
  train: {{source: digits, split: train}}
  {eval}
  eval_extra:
    {extra}
stages:
  - quantize: {{method: rtn, bits: 8}}
gates:
  min_accuracy: 0.5
  max_accuracy_drop: 0.05
"""


def _write(tmp_path, extra: str, eval_line: str = "eval: {source: digits, split: test}"):
    x, y = builtin("digits", "test")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "shuffled.npz", x=x, y=rng.permutation(y))  # labels no model can match
    np.savez(tmp_path / "same.npz", x=x, y=y)
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(eval=eval_line, extra=extra))
    return path


def test_every_gate_holds_on_each_extra_set(cli, tmp_path, digits_mlp_path):
    recipe = _write(tmp_path, "clean: {source: file, path: same.npz}\n    shuffled: {source: file, path: shuffled.npz}")
    code, out, err = cli("run", recipe, digits_mlp_path, "-o", tmp_path / "o", "--json")
    assert code == 1, err  # a gate failed
    report = json.loads(out)
    checks = {c["gate"]: c for c in report["gates"]}
    assert checks["min_accuracy"]["passed"] and checks["min_accuracy[clean]"]["passed"]
    assert not checks["min_accuracy[shuffled]"]["passed"] and checks["min_accuracy[shuffled]"]["measured"] < 0.3
    # the drop is measured against the input model on the same set: small even on shuffled labels
    assert checks["max_accuracy_drop[shuffled]"]["passed"]
    for row in report["stages"]:
        assert set(row["eval_extra"]) == {"clean", "shuffled"}
        assert abs(row["eval_extra"]["clean"]["accuracy"] - row["accuracy"]) < 1e-9  # same data as eval
    assert "min_accuracy[shuffled]" in err or "min_accuracy[shuffled]" in out


def test_bad_extra_sets_are_refused_before_running(cli, tmp_path, digits_mlp_path):
    recipe = _write(tmp_path, "'bad name': {source: file, path: same.npz}")
    code, _, err = cli("check", recipe)
    assert code == 2 and "eval_extra set name 'bad name'" in err
    recipe = _write(tmp_path, "clean: {source: file, path: same.npz}", eval_line="")
    code, _, err = cli("run", recipe, digits_mlp_path, "-o", tmp_path / "o")
    assert code == 2 and "data.eval_extra adds held-out sets to data.eval" in err
    recipe = _write(tmp_path, "gone: {source: file, path: missing.npz}")
    code, _, err = cli("run", recipe, digits_mlp_path, "-o", tmp_path / "o2")
    assert code == 2 and "missing.npz" in err


def test_min_cosine_p05_gate_reads_the_worst_samples(cli, tmp_path, digits_mlp_path):
    recipe = _write(tmp_path, "clean: {source: file, path: same.npz}")
    text = recipe.read_text().replace("  min_accuracy: 0.5\n", "  min_cosine_p05: 0.9999999\n")
    recipe.write_text(text.replace("bits: 8", "bits: 2"))  # 2-bit weights: some samples drift
    code, out, _err = cli("run", recipe, digits_mlp_path, "-o", tmp_path / "o", "--json")
    checks = {c["gate"]: c for c in json.loads(out)["gates"]}
    assert code == 1 and not checks["min_cosine_p05"]["passed"] and not checks["min_cosine_p05[clean]"]["passed"]
    final = json.loads(out)["stages"][-1]
    assert checks["min_cosine_p05"]["measured"] == final["cosine_p05"] < final["cosine"]
