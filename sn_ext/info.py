"""`python -m sn_ext.info`: prints sn_ext.info() (versions, and which backends are usable here and why).

Importing this module (`import sn_ext.info`) makes Python set the attribute `sn_ext.info` to it, hiding the function
of that name; the module is therefore callable, as the function, so `sn_ext.info()` works either way."""

import json
import sys
import types

from ._info import info


class _CallableModule(types.ModuleType):
    def __call__(self) -> dict:
        return info()


if __name__ == "__main__":
    print(json.dumps(info(), indent=2))
else:
    sys.modules[__name__].__class__ = _CallableModule
