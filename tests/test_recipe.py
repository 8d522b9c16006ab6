"""Recipes: the YAML round trip is lossless, overrides parse as YAML, and every shipped recipe is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from qdistill.errors import RecipeError
from qdistill.recipe import Recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_yaml_round_trip_gives_an_equal_recipe(tmp_path):
    recipe = Recipe(model={"name": "tiny_resnet", "kwargs": {"width": 8}}, data={"name": "digits", "test_fraction": 0.1},
                    quant={"weight_bits": 3, "overrides": {"layer1.*": {"act_bits": 8}}},
                    distill={"features": [{"student": "layer1", "teacher": "layer1", "weight": 0.5}]},
                    train={"epochs": 2, "schedule": "step", "target_accuracy": 0.9})
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    again = Recipe.from_yaml(path)
    assert again == recipe and again.to_yaml() == recipe.to_yaml()


def test_overrides_parse_values_as_yaml():
    recipe = Recipe().with_overrides(["train.epochs=3", "quant.overrides={fc: {weight_bits: 8}}", "student={name: mlp}"])
    assert recipe.train.epochs == 3 and recipe.quant.overrides["fc"].weight_bits == 8 and recipe.student.name == "mlp"
    with pytest.raises(RecipeError, match="expected key.sub=value"):
        Recipe().with_overrides(["train.epochs"])


@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_shipped_recipe_is_valid(path):
    recipe = Recipe.from_yaml(path)
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_recipes_are_shipped():
    assert len(RECIPES) >= 3
