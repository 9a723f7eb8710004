"""Recipe loading and validation: every error names the file, the key and the choices."""

from __future__ import annotations

import pytest

from compressor.errors import OptionsError, RecipeError
from compressor.recipe import builtin_recipes, load_recipe


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builtin_fold_loads_with_defaults():
    recipe = load_recipe("fold")
    assert [s.name for s in recipe.passes] == ["fold-constants", "fold-batchnorm", "fold-layernorm-affine"]
    assert recipe.accuracy.max_drop is None
    assert "fold" in builtin_recipes()
    resolved = recipe.to_json()
    assert resolved["passes"][0] == {"fold-constants": resolved["passes"][0]["fold-constants"]}


def test_unknown_builtin_lists_choices():
    with pytest.raises(RecipeError, match=r"unknown recipe 'nope'; built-in recipes: .*fold"):
        load_recipe("nope")


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match=r"no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "passes: [fold-constants\nname: x: y\n")
    with pytest.raises(RecipeError, match=rf"{path}: invalid YAML at line \d+"):
        load_recipe(path)


def test_unknown_top_level_key_suggests(tmp_path):
    path = write(tmp_path, "passes: [fold-constants]\ncalibraton: {samples: 3}\n")
    with pytest.raises(RecipeError, match=r"unknown key 'calibraton' \(did you mean 'calibration'\?\); valid keys: "):
        load_recipe(path)


def test_unknown_pass_lists_valid(tmp_path):
    path = write(tmp_path, "passes: [fold-constants, fold-everything]\n")
    with pytest.raises(RecipeError, match=rf"{path}: passes\[1\]: unknown pass 'fold-everything'; valid passes: .*fold-batchnorm"):
        load_recipe(path)


def test_unknown_pass_option_lists_valid(tmp_path):
    path = write(tmp_path, "passes:\n  - fold-constants\n  - fold-batchnorm: {bogus: 1}\n")
    with pytest.raises(OptionsError, match=r"passes\[1\] fold-batchnorm: unknown option 'bogus'; valid options: "):
        load_recipe(path)


def test_wrong_option_type(tmp_path):
    path = write(tmp_path, "passes: [fold-constants]\naccuracy: {max_drop: lots}\n")
    # ``float | None``: the error is the float's own, not a list of the union's types
    with pytest.raises(OptionsError, match=r"accuracy: option 'max_drop': expected a number, got 'lots'"):
        load_recipe(path)


def test_invalid_value_range(tmp_path):
    path = write(tmp_path, "passes: [fold-constants]\naccuracy: {max_drop: -1}\n")
    with pytest.raises(OptionsError, match=r"max_drop' must be a finite number >= 0"):
        load_recipe(path)


def test_metric_choices(tmp_path):
    path = write(tmp_path, "passes: [fold-constants]\naccuracy: {metric: f1}\n")
    with pytest.raises(OptionsError, match=r"'f1' is not one of 'auto', 'top1', 'cosine'"):
        load_recipe(path)


def test_empty_passes(tmp_path):
    path = write(tmp_path, "passes: []\n")
    with pytest.raises(RecipeError, match=r"'passes' must be a non-empty list"):
        load_recipe(path)


def test_overrides_apply():
    recipe = load_recipe("fold").with_overrides(max_drop=0.02)
    assert recipe.accuracy.max_drop == 0.02
    assert recipe.to_json()["accuracy"]["max_drop"] == 0.02


# -- a target completes a recipe (Capabilities.after_quantize) -----------------------------------------------


class _HtpData:
    """A target with qnn-htp's capabilities and no backend (recipe resolution reads only data)."""

    name = "qnn-htp"

    def __init__(self) -> None:
        from compressor.targets.qnn_htp.rules import QNN_HTP_CAPABILITIES

        self.capabilities = QNN_HTP_CAPABILITIES


def _names(recipe):
    return [s.name for s in recipe.passes]


@pytest.mark.parametrize("activations", ["int8", "int16"])
def test_a_quantizing_recipe_gets_the_targets_pass_with_the_quantize_width(tmp_path, activations):
    path = write(tmp_path, f"name: mine\npasses:\n  - fold-constants\n  - quantize: {{activations: {activations}}}\n")
    recipe = load_recipe(path).for_target(_HtpData())
    assert _names(recipe) == ["fold-constants", "quantize", "qnn-legalize"]
    assert recipe.passes[-1].options == {"activations": activations, "weights": "int8-per-channel"}
    assert recipe.target_passes == ("qnn-legalize",) and recipe.target_steps == recipe.passes[-1:]
    resolved = recipe.to_json()
    assert resolved["target_passes"] == ["qnn-legalize"]
    assert resolved["passes"][-1]["qnn-legalize"]["activations"] == activations


def test_the_targets_pass_goes_before_a_pass_that_measures_on_the_device(tmp_path):
    """``device-bias-correction`` measures the model as lowered: ``qnn-legalize`` must run first."""
    path = write(tmp_path, "name: mine\npasses:\n  - quantize\n  - device-bias-correction\n")
    recipe = load_recipe(path).for_target(_HtpData())
    assert _names(recipe) == ["quantize", "qnn-legalize", "device-bias-correction"]
    assert [s.name for s in recipe.target_steps] == ["qnn-legalize"]


@pytest.mark.parametrize("passes", [["device-bias-correction", "quantize"],
                                    ["quantize", "device-bias-correction", "qnn-legalize"]])
def test_a_pass_that_measures_on_the_device_before_the_model_is_lowered_is_refused(tmp_path, passes):
    path = write(tmp_path, "name: mine\npasses:\n" + "".join(f"  - {p}\n" for p in passes))
    later = "quantize" if passes[0] == "device-bias-correction" else "qnn-legalize"
    with pytest.raises(RecipeError, match=f"pass 'device-bias-correction' measures the model on qnn-htp's device "
                                          f"and must come after '{later}': move it to the end of the passes"):
        load_recipe(path).for_target(_HtpData())


def test_builtin_int8_on_qnn_htp_takes_the_default_width():
    recipe = load_recipe("int8").for_target(_HtpData())
    assert _names(recipe)[-2:] == ["quantize", "qnn-legalize"]
    assert recipe.passes[-1].options == {"activations": "int8", "weights": "int8-per-channel"}  # quantize's defaults


@pytest.mark.parametrize("name", ["w8a8-npu", "w8a16-npu"])
def test_a_recipe_that_runs_the_pass_already_is_not_completed_twice(name):
    recipe = load_recipe(name)
    completed = recipe.for_target(_HtpData())
    assert completed == recipe and _names(completed).count("qnn-legalize") == 1
    assert "target_passes" not in completed.to_json()
    again = load_recipe("int8").for_target(_HtpData())
    assert again.for_target(_HtpData()) == again  # idempotent


def test_a_pass_providing_what_the_target_pass_provides_counts_as_present(tmp_path):
    # qnn-quantize-tensors alone provides 'qnn-legalized' (a recipe that wants only some steps)
    path = write(tmp_path, "passes:\n  - quantize\n  - qnn-quantize-tensors: {activations: int8}\n")
    recipe = load_recipe(path)
    assert recipe.for_target(_HtpData()) == recipe


@pytest.mark.parametrize("name", ["fold", "prune-50"])
def test_a_recipe_that_does_not_quantize_is_left_as_it_is(name):
    recipe = load_recipe(name)
    completed = recipe.for_target(_HtpData())
    assert completed == recipe and "qnn-legalize" not in _names(completed) and completed.target_passes == ()


def test_a_target_without_after_quantize_passes_leaves_int8_as_it_is():
    from compressor.targets.onnx import OnnxTarget

    recipe = load_recipe("int8")
    assert recipe.for_target(OnnxTarget()) == recipe
