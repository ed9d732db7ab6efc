"""Benchmark scorers with the anchors' own formats and rules: GenEval (text-to-image) and
GEdit-Bench (editing), with swappable detector / judge back ends named next to every score."""
