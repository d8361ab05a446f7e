"""Bad input: each case exits with the documented code and a message naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.zoo import digits_mlp


def test_run_succeeds_and_prints_where_artifacts_are(cli, write_recipe, digits_mlp_path, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = cli("run", write_recipe(), digits_mlp_path, "-o", out)
    assert code == 0, stderr
    assert str(out) in stdout and "report.md" in stdout
    assert (out / "report.json").is_file() and (out / "model.onnx").is_file()
    assert "[1/1] export" in stderr  # plain progress lines when not a TTY


def test_yaml_syntax_error(cli, write_recipe, digits_mlp_path):
    code, _, err = cli("run", write_recipe(text="version: 1\nmodel: {input_shape: [1, 64]\n"), digits_mlp_path)
    assert code == 2
    assert "YAML syntax error" in err and "recipe.yaml:3" in err


def test_unknown_key_suggests_close_match(cli, write_recipe, digits_mlp_path):
    code, _, err = cli("run", write_recipe(gates="  max_latncy_ms: 3"), digits_mlp_path)
    assert code == 2
    assert "unknown key 'max_latncy_ms'" in err and "did you mean 'max_latency_ms'" in err


def test_wrong_value_type(cli, write_recipe, digits_mlp_path):
    code, _, err = cli("run", write_recipe(stages="  - export: {latency_runs: many}"), digits_mlp_path)
    assert code == 2
    assert "stages.0.export.latency_runs" in err and "'many'" in err


def test_unknown_stage_lists_available(cli, write_recipe, digits_mlp_path):
    code, _, err = cli("run", write_recipe(stages="  - sparsify: {}"), digits_mlp_path)
    assert code == 2
    assert "unknown stage 'sparsify'" in err and "export" in err


def test_missing_model_file(cli, write_recipe, tmp_path):
    code, _, err = cli("run", write_recipe(), tmp_path / "missing.pt")
    assert code == 2 and "model file not found" in err


def test_random_bytes_as_model(cli, write_recipe, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    code, _, err = cli("run", write_recipe(), junk)
    assert code == 2 and "not a PyTorch model file" in err


def test_pickled_module_needs_trust(cli, write_recipe, digits_mlp_path, tmp_path):
    model = digits_mlp(hidden=(32,))
    model.load_state_dict(torch.load(digits_mlp_path, weights_only=True))
    pickled = tmp_path / "whole.pt"
    torch.save(model, pickled)
    code, _, err = cli("run", write_recipe(), pickled, "-o", tmp_path / "o1")
    assert code == 2
    assert "runs arbitrary code" in err and "--trust-model" in err and "state_dict" in err
    code, _, err = cli("run", write_recipe(), pickled, "-o", tmp_path / "o2", "--trust-model")
    assert code == 0, err


def test_torchscript_model_runs(cli, write_recipe, digits_mlp_path, tmp_path):
    model = digits_mlp(hidden=(32,))
    model.load_state_dict(torch.load(digits_mlp_path, weights_only=True))
    scripted = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(model), scripted)
    code, _, err = cli("run", write_recipe(), scripted, "-o", tmp_path / "o")
    assert code == 0, err


def test_state_dict_without_factory(cli, write_recipe, digits_mlp_path, tmp_path):
    text = write_recipe().read_text().replace("  factory: compress.zoo:digits_mlp\n", "")
    code, _, err = cli("run", write_recipe(text=text), digits_mlp_path)
    assert code == 2 and "model.factory" in err


def test_state_dict_of_another_architecture(cli, write_recipe, digits_mlp_path):
    text = write_recipe().read_text().replace("hidden: [32]", "hidden: [48]")
    code, _, err = cli("run", write_recipe(text=text), digits_mlp_path)
    assert code == 2 and "does not fit the architecture" in err


def test_forward_fails_on_declared_shape(cli, write_recipe, digits_mlp_path):
    text = write_recipe(stages="  []").read_text().replace("input_shape: [1, 64]", "input_shape: [1, 40]")
    text = text.split("data:")[0] + "stages: []\n"  # no data: the declared shape alone is tried
    code, _, err = cli("run", write_recipe(text=text), digits_mlp_path)
    assert code == 2
    assert "forward fails on the declared input_shape [1, 40]" in err


def test_missing_data_file(cli, write_recipe, digits_mlp_path, tmp_path):
    text = (
        write_recipe()
        .read_text()
        .replace("eval: {source: digits, split: test}", "eval: {source: file, path: nothere.npz}")
    )
    code, _, err = cli("run", write_recipe(text=text), digits_mlp_path)
    assert code == 2 and "data file not found" in err and "nothere.npz" in err


def test_data_of_wrong_shape(cli, write_recipe, digits_mlp_path, tmp_path):
    np.savez(tmp_path / "eval.npz", x=np.zeros((10, 40), np.float32), y=np.zeros(10, np.int64))
    text = (
        write_recipe()
        .read_text()
        .replace("eval: {source: digits, split: test}", "eval: {source: file, path: eval.npz}")
    )
    code, _, err = cli("run", write_recipe(text=text), digits_mlp_path)
    assert code == 2
    assert "shape [40]" in err and "[1, 64]" in err


def test_integer_data_for_a_float_model(cli, write_recipe, digits_mlp_path, tmp_path):
    np.savez(tmp_path / "eval.npz", x=np.zeros((10, 64), np.int64), y=np.zeros(10, np.int64))
    text = (
        write_recipe()
        .read_text()
        .replace("eval: {source: digits, split: test}", "eval: {source: file, path: eval.npz}")
    )
    code, _, err = cli("run", write_recipe(text=text), digits_mlp_path)
    assert code == 2 and "torch.int64 inputs but model.input_dtype is float32" in err


def test_unwritable_output_folder(cli, write_recipe, digits_mlp_path, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = cli("run", write_recipe(), digits_mlp_path, "-o", blocker / "out")
    assert code == 2 and "not writable" in err


def test_failing_gate_exits_1_and_says_which(cli, write_recipe, digits_mlp_path, tmp_path):
    code, out, _ = cli("run", write_recipe(gates="  max_size_bytes: 100"), digits_mlp_path, "-o", tmp_path / "o")
    assert code == 1
    last = out.strip().splitlines()[-1]
    assert last.startswith("FAILED") and "max_size_bytes" in last and "limit 100" in last


def test_gate_that_needs_a_missing_stage(cli, write_recipe, digits_mlp_path):
    code, _, err = cli("run", write_recipe(stages="  []", gates="  max_latency_ms: 1"), digits_mlp_path)
    assert code == 2 and "max_latency_ms needs a stage that measures latency: export" in err


def test_internal_error_has_message_not_traceback(cli, write_recipe, digits_mlp_path, tmp_path, monkeypatch):
    import compress.export.stage

    def boom(*a, **k):
        raise ZeroDivisionError("kaboom")

    monkeypatch.setattr(compress.export.stage, "export_onnx", boom)
    code, _, err = cli("run", write_recipe(), digits_mlp_path, "-o", tmp_path / "o")
    assert code == 3
    assert "export" in err and "kaboom" in err and "Traceback" not in err


def test_json_output_is_the_report(cli, write_recipe, digits_mlp_path, tmp_path):
    import json

    code, out, _ = cli("run", write_recipe(), digits_mlp_path, "-o", tmp_path / "o", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["passed"] and [s["stage"] for s in report["stages"]] == ["input", "export"]


def test_check_command(cli, write_recipe):
    code, _, err = cli("check", write_recipe())
    assert code == 0 and "valid" in err
    code, _, err = cli("check", write_recipe(gates="  bogus: 1"))
    assert code == 2 and "unknown key 'bogus'" in err


@pytest.mark.parametrize("target", ["model", "stage", "onnx"])
def test_inspect(cli, write_recipe, digits_mlp_path, tmp_path, target):
    out = tmp_path / "o"
    assert cli("run", write_recipe(), digits_mlp_path, "-o", out)[0] == 0
    path = {"model": digits_mlp_path, "stage": out / "stages" / "01-export", "onnx": out / "model.onnx"}[target]
    code, stdout, err = cli("inspect", path)
    assert code == 0, err
    assert "net.0.weight" in stdout
    assert "total: 2,410 values" in stdout  # 64*32+32 + 32*10+10


def test_pack_unpack_commands_round_trip_an_onnx_file(cli, write_recipe, digits_mlp_path, tmp_path):
    out = tmp_path / "o"
    assert cli("run", write_recipe(), digits_mlp_path, "-o", out)[0] == 0
    packed, restored = tmp_path / "m.czip", tmp_path / "restored.onnx"
    code, stdout, err = cli("pack", out / "model.onnx", packed)
    assert code == 0, err
    assert "ratio" in stdout
    code, _, err = cli("unpack", packed, restored)
    assert code == 0, err
    assert restored.read_bytes() == (out / "model.onnx").read_bytes()
    code, _, err = cli("unpack", tmp_path / "missing.czip")
    assert code == 2
