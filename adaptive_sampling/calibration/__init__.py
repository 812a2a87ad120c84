"""Calibration: search skip schedules (or shorter grids) offline on a few samples, then fix them.

* ``greedy``: the greedy optimal path (drop the call whose removal moves the output least, one
  at a time), per sample or shared over a calibration set, with nested masks for every K;
* ``proxy``: the cheap search: greedy on an error proxy measured along a few sampling runs;
* ``search``: ``calibrate`` / ``calibration_path``, which turn a search over calibration samples
  (proxy by default, greedy as the exact option) into a ``Calibrated`` schedule or a K-point grid.
"""

from .greedy import GreedyPath, greedy_masks, greedy_path
from .proxy import proxy_path
from .search import AGGREGATES, DEFAULT_REUSE, CalibrationPath, calibrate, calibration_path

__all__ = ["calibrate", "calibration_path", "CalibrationPath", "AGGREGATES", "DEFAULT_REUSE", "greedy_path", "greedy_masks", "GreedyPath",
           "proxy_path"]
