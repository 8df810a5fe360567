"""Evaluation of a trained classifier: metrics, calibration, breakdowns by group, an HTML report.

`metrics` and `groups` are pure functions from numpy labels and probabilities to JSON-ready
dicts; `report` turns those dicts into PNG plots and a self-contained `report.html`.
"""
