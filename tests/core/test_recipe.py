"""Recipe parsing: typed objects, errors that name file/line/key/value, the generated schema."""

from __future__ import annotations

import json

import pytest
import yaml

from compress.errors import RecipeError
from compress.recipe import json_schema, load_recipe, parse_recipe

GOOD = """\
version: 1
model:
  factory: compress.zoo:digits_mlp
  input_shape: [1, 64]
data:
  eval: {source: digits, split: test}
stages:
  - export: {opset: 21}
gates: {max_accuracy_drop: 0.01}
"""


def test_parses_into_typed_objects():
    r = parse_recipe(GOOD, "r.yaml")
    assert r.doc.model.input_shape == [1, 64]
    assert r.stages[0].name == "export"
    assert r.stages[0].config.opset == 21
    assert r.stages[0].config.atol == 1e-4  # default filled in
    assert r.doc.gates.max_accuracy_drop == 0.01


def test_round_trips_through_yaml():
    r = parse_recipe(GOOD, "r.yaml")
    again = parse_recipe(r.to_yaml(), "again.yaml")
    assert again.to_yaml() == r.to_yaml()
    assert again.stages[0].config_hash() == r.stages[0].config_hash()


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("input_shape: [1, 64]", "input_shape: [1, 64"), ["r.yaml:", "YAML syntax error"]),
        (
            GOOD.replace("max_accuracy_drop", "max_acuracy_drop"),
            ["r.yaml:9", "unknown key 'max_acuracy_drop'", "did you mean 'max_accuracy_drop'"],
        ),
        (GOOD.replace("opset: 21", "opset: twenty"), ["r.yaml:8", "stages.0.export.opset", "'twenty'"]),
        (GOOD.replace("opset: 21", "opsett: 21"), ["unknown key 'opsett'", "did you mean 'opset'"]),
        (
            GOOD.replace("- export:", "- exprot:"),
            ["r.yaml:8", "unknown stage 'exprot'", "available stages:", "export", "did you mean 'export'"],
        ),
        (GOOD.replace("source: digits", "source: cifar"), ["r.yaml:6", "data.eval.source", "'mnist1d'", "'cifar'"]),
        (GOOD.replace("version: 1", "version: 7"), ["r.yaml:1", "version", "7"]),
        (GOOD.replace("  input_shape: [1, 64]\n", ""), ["missing required key 'input_shape'"]),
        (GOOD.replace("[1, 64]", "[1, -64]"), ["input_shape dimensions must be positive"]),
        ("- just a list", ["must be a mapping"]),
        (GOOD.replace("  - export: {opset: 21}", "  - export: {opset: 21}\n    prune: {}"), ["one-key mapping"]),
    ],
    ids=[
        "syntax",
        "unknown-key",
        "wrong-type",
        "unknown-stage-key",
        "unknown-stage",
        "bad-enum",
        "version",
        "missing",
        "negative-shape",
        "not-mapping",
        "two-key-stage",
    ],
)
def test_bad_recipes_name_the_problem(text, expected):
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "r.yaml")
    for fragment in expected:
        assert fragment in str(err.value), str(err.value)


def test_stage_method_errors_list_the_methods():
    text = GOOD.replace("  - export: {opset: 21}", "  - quantize: {bits: 4}")
    with pytest.raises(
        RecipeError, match=r"r\.yaml:8: stages\.0\.quantize: missing key 'method'; one of: codebook, gpfq, rtn"
    ):
        parse_recipe(text, "r.yaml")
    text = GOOD.replace("  - export: {opset: 21}", "  - quantize: {method: gpfg}")
    with pytest.raises(RecipeError, match=r"unknown method 'gpfg'; one of: codebook, gpfq, rtn; did you mean 'gpfq'\?"):
        parse_recipe(text, "r.yaml")


def test_syntax_error_shows_the_line():
    text = GOOD.replace("gates: {max_accuracy_drop: 0.01}", "gates: {max_accuracy_drop: 0.01")
    with pytest.raises(RecipeError, match=r"r\.yaml:1\d:\d+: YAML syntax error"):
        parse_recipe(text, "r.yaml")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_schema_is_valid_and_matches_the_parser(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors(yaml.safe_load(GOOD)))
    bad = yaml.safe_load(GOOD.replace("opset: 21", "opsett: 21"))
    assert list(validator.iter_errors(bad))
    # every key documented
    export_item = next(i for i in schema["properties"]["stages"]["items"]["oneOf"] if i["title"] == "export")
    assert export_item["properties"]["export"]["properties"]["opset"]["description"]
    for name, prop in schema["properties"].items():
        assert prop.get("description") or "$ref" in prop or "anyOf" in prop, name


def test_shipped_recipes_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml")):
        load_recipe(path)


def test_schema_command_prints_json(cli):
    code, out, _ = cli("schema")
    assert code == 0
    assert json.loads(out)["title"] == "compress recipe"
