"""llmkit.core.yamlfile: YAML settings files and overrides read ``1e4`` as a number (YAML 1.2),
not as the string PyYAML's YAML 1.1 makes of it."""

from __future__ import annotations

import pytest

from llmkit.core.yamlfile import safe_load


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e4", 1e4), ("3e-4", 3e-4), ("-2E+3", -2000.0), ("1.5e2", 150.0), ("1_000e2", 1e5)],
)
def test_exponent_numbers_are_floats(text, value):
    assert safe_load(f"x: {text}") == {"x": value}


@pytest.mark.parametrize(("text", "value"), [('"1e4"', "1e4"), ("1e4x", "1e4x"), ("12", 12)])
def test_everything_else_is_read_as_before(text, value):
    assert safe_load(f"x: {text}") == {"x": value}


def test_a_recipe_and_a_prepare_config_get_the_number(tmp_path):
    """`model.extra={rope_theta: 1e4}` reached transformers as the string '1e4' (a TypeError
    once the model read it); prepare.yaml's `threshold: 8e-1` was 'expected float, got str'."""
    from llmkit.data.config import PrepareSettings
    from llmkit.training.config import load_recipe

    assert load_recipe(None, ["model.extra={rope_theta: 1e4}"]).model.extra == {"rope_theta": 1e4}
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text("dedup: {threshold: 8e-1}\n")
    assert PrepareSettings.load(cfg).cleaning.dedup.threshold == 0.8
