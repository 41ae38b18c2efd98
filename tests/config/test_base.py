"""Every configuration model of the package is strict through the one base in config_base."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError
from speccascade.config.base import StrictModel

PACKAGE = Path(__file__).resolve().parents[1] / "services" / "speccascade"


def test_no_module_but_config_base_subclasses_pydantic_directly():
    direct = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "config_base.py" or "api/v1" in path.as_posix():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
                         for base in node.bases}
                if "BaseModel" in bases:
                    direct.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert direct == [], "derive configuration models from speccascade.config.base.StrictModel"


def test_the_base_forbids_unknown_keys_and_freezes_values():
    class Example(StrictModel):
        size: int = 1

    with pytest.raises(ValidationError, match="sise"):
        Example.model_validate({"sise": 2})
    with pytest.raises(ValidationError, match="frozen"):
        Example().size = 3
