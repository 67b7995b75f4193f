import os
import sys

# The test modules import their shared helpers as `helpers`, whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(__file__))
