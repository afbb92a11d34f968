"""Measurements of the tool itself: each compares edgebuild with a reference in one run
(``edgebuild measure ...``, the ``make bench-*`` targets)."""
