"""Hostile and malformed recipes: each is refused with exit 2 and a message naming the
problem, before anything runs, in bounded time and memory."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from compress.errors import RecipeError
from compress.recipe import parse_recipe

BASE = """\
version: 1
model:
  factory: compress.zoo:digits_mlp
  kwargs: {hidden: [32]}
  input_shape: [1, 64]
data:
  train: {source: digits, split: train}
  eval: {source: digits, split: test}
"""


def _refused(cli, write_recipe, digits_mlp_path, tmp_path, text: str) -> str:
    code, out, err = cli("run", write_recipe(text=text), digits_mlp_path, "-o", tmp_path / "out")
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- code a recipe may run

DANGEROUS = [
    ("model", "os:system", "  factory: os:system\n  kwargs: {command: 'touch {marker}'}\n"),
    ("model", "subprocess:run", "  factory: subprocess:run\n  kwargs: {args: ['touch', '{marker}']}\n"),
    ("model", "builtins:eval", "  factory: builtins:eval\n  kwargs: {source: \"open('{marker}', 'w')\"}\n"),
    ("model", "posix:system", "  factory: posix:system\n  kwargs: {command: 'touch {marker}'}\n"),
    ("model", "torch.hub:load", "  factory: torch.hub:load\n  kwargs: {repo_or_dir: x, model: y}\n"),
    ("data", "subprocess:check_output", None),
]


@pytest.mark.parametrize("where,ref,model_yaml", DANGEROUS, ids=[d[1] for d in DANGEROUS])
def test_dangerous_callables_refused_and_nothing_runs(cli, tmp_path, digits_mlp_path, where, ref, model_yaml):
    marker = tmp_path / "ran"
    if where == "model":
        text = BASE.replace(
            "  factory: compress.zoo:digits_mlp\n  kwargs: {hidden: [32]}\n",
            model_yaml.replace("{marker}", str(marker)),
        )
    else:
        (tmp_path / "lines.txt").write_text(f"touch {marker}\n")
        text = BASE + f"  calibration: {{source: text, path: lines.txt, fn: '{ref}', kwargs: {{shell: true}}}}\n"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(text)
    for command in (("check", recipe), ("run", recipe, digits_mlp_path, "-o", tmp_path / "out")):
        code, _, err = cli(*command)
        assert code == 2, err
        assert "refused" in err and ref in err and "trusted_callables" in err
    assert not marker.exists()


def test_reexported_stdlib_function_refused_at_resolution(tmp_path, monkeypatch):
    """A third-party module that re-exports os.system does not open the door."""
    from compress.errors import ModelLoadError
    from compress.imports import import_callable

    (tmp_path / "sneaky.py").write_text("from os import system\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError, match="posix.system|os.system"):
        import_callable("sneaky:system", "model factory", ModelLoadError)
    assert import_callable("sneaky:system", "model factory", ModelLoadError, trusted={"sneaky:system"})


def test_trusted_callables_opt_in_allows_stdlib(tmp_path):
    text = BASE.replace("version: 1\n", "version: 1\ntrusted_callables: ['collections:OrderedDict']\n").replace(
        "compress.zoo:digits_mlp", "collections:OrderedDict"
    )
    recipe = parse_recipe(text)
    assert recipe.imports() == [(("model", "factory"), "collections:OrderedDict")]
    with pytest.raises(RecipeError, match="model.factory.*refused"):
        parse_recipe(BASE.replace("compress.zoo:digits_mlp", "collections:OrderedDict"))


def test_check_lists_every_import(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    (tmp_path / "t.txt").write_text("a\n")
    recipe.write_text(BASE + "  calibration: {source: text, path: t.txt, fn: 'mytok.tok:encode'}\n")
    code, out, err = cli("check", recipe)
    assert code == 0, err
    text = out + err
    assert "model.factory: compress.zoo:digits_mlp" in text
    assert "data.calibration.fn: mytok.tok:encode" in text


# ----------------------------------------------------------------------------- denial of service


def _bounded(text: str, match: str) -> None:
    """parse_recipe refuses ``text`` in under 2 s and 200 MB of Python allocations."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(RecipeError, match=match):
            parse_recipe(text, "bomb.yaml")
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0
    assert peak < 200 * 2**20, peak


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)


def test_alias_bomb_refused_fast(cli, write_recipe, digits_mlp_path, tmp_path):
    _bounded(ALIAS_BOMB, "aliases")
    bomb_in_kwargs = "anchors:\n" + "".join("  " + line + "\n" for line in ALIAS_BOMB.splitlines())
    _bounded(bomb_in_kwargs + BASE.replace("kwargs: {hidden: [32]}", "kwargs: {hidden: [32], junk: *i}"), "aliases")
    err = _refused(cli, write_recipe, digits_mlp_path, tmp_path, ALIAS_BOMB)
    assert "aliases" in err


def test_deep_nesting_refused_fast():
    deep = "version: 1\nmodel: " + "{a: " * 600 + "1" + "}" * 600 + "\n"
    _bounded(deep, "nested more than")
    deep_block = "version: 1\nx:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(600)) + "  " * 601 + "v\n"
    _bounded(deep_block, "nested more than")


def test_huge_recipe_refused_fast(tmp_path):
    from compress.recipe import load_recipe

    path = tmp_path / "big.yaml"
    path.write_text(BASE + "# " + "x" * (50 << 20) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match="at most"):
        load_recipe(path)
    assert time.perf_counter() - t0 < 2.0
    _bounded(BASE + "#" + "y" * (2 << 20), "at most")


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "stages,key",
    [
        ("  - prune: {method: magnitude, amount: 0.5, finetune: {epochs: 1, lr: .inf}}", "lr"),
        ("  - prune: {method: magnitude, amount: 0.5, finetune: {epochs: 1, weight_decay: .inf}}", "weight_decay"),
        ("  - prune: {method: magnitude, amount: 0.5, kd_temperature: .inf}", "kd_temperature"),
        ("  - prune: {method: magnitude, amount: .nan}", "amount"),
    ],
)
def test_non_finite_numbers_refused(stages, key):
    with pytest.raises(RecipeError, match=f"{key}.*(finite|nan|inf)"):
        parse_recipe(BASE + "stages:\n" + stages + "\n")


def test_non_finite_gate_refused():
    with pytest.raises(RecipeError, match="max_latency_ms.*finite"):
        parse_recipe(BASE + "gates: {max_latency_ms: .inf}\n")


@pytest.mark.parametrize("seed", ["-1", "1.0e+23", "true"])
def test_bad_global_seed(seed):
    with pytest.raises(RecipeError, match="seed"):
        parse_recipe(BASE.replace("version: 1\n", f"version: 1\nseed: {seed}\n"))


def test_negative_split_seed():
    with pytest.raises(RecipeError, match="data.eval.seed"):
        parse_recipe(
            BASE.replace("eval: {source: digits, split: test}", "eval: {source: digits, split: test, seed: -3}")
        )


def test_version_true_refused():
    with pytest.raises(RecipeError, match="version"):
        parse_recipe(BASE.replace("version: 1", "version: true"))


def test_absurd_input_shape_without_data_refused(cli, write_recipe, digits_mlp_path, tmp_path):
    text = BASE.replace("input_shape: [1, 64]", "input_shape: [1000000000, 40]").split("data:")[0]
    err = _refused(cli, write_recipe, digits_mlp_path, tmp_path, text)
    assert "input_shape" in err and "elements" in err


def test_misplaced_key_does_not_suggest_itself():
    with pytest.raises(RecipeError) as e:
        parse_recipe(BASE + "gates: {seed: 3}\n")
    assert "did you mean 'seed'" not in str(e.value)
    assert "'seed' is not allowed under gates" in str(e.value)


@pytest.mark.parametrize("seed", ["-1", "1.0e+23"])
def test_bad_training_seed(seed):
    with pytest.raises(RecipeError, match="stages.0.finetune.train.seed"):
        parse_recipe(BASE + f"stages:\n  - finetune: {{train: {{epochs: 1, seed: {seed}}}}}\n")
