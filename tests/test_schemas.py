"""The operator schemas exist once in C++ (csrc/sn_ext.cpp) and once in Python (sn_ext/_schemas.py, for the
fallback). These tests keep the two copies equal, whichever of them defined the ops in this process."""

import re
from pathlib import Path

import pytest
import torch

from sn_ext import _schemas

CPP_SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "sn_ext.cpp"


def cpp_schemas() -> dict[str, str]:
    """name -> schema text, read from the m.def("...") calls (adjacent string literals joined)."""
    text = CPP_SOURCE.read_text()
    schemas = {}
    for call in re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", text):
        full = "".join(re.findall(r"\"([^\"]*)\"", call))
        name, rest = full.split("(", 1)
        schemas[name] = "(" + rest
    return schemas


def normalized(schema: str) -> str:
    return str(torch._C.parse_schema("sn_ext::op" + schema))


def test_cpp_and_python_copies_define_the_same_ops():
    assert set(cpp_schemas()) == set(_schemas.SCHEMAS)
    for name, schema in cpp_schemas().items():
        assert normalized(schema) == normalized(_schemas.SCHEMAS[name]), name


@pytest.mark.parametrize("name", sorted(_schemas.SCHEMAS))
def test_registered_op_has_the_python_schema(name):
    registered = getattr(torch.ops.sn_ext, name).default._schema
    assert str(registered).replace(f"sn_ext::{name}", "sn_ext::op") == normalized(_schemas.SCHEMAS[name])
