"""`python -m sn_ext.info`: prints sn_ext.info() (versions, and which backends are usable here and why)."""
import json

from ._info import info

if __name__ == "__main__":
    print(json.dumps(info(), indent=2))
