"""tests/torch: the models of `training.py` are imported by name from this folder."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
