"""Benchmarks: each module has ``main(quick: bool = False) -> list[dict]``, which prints
its table (ms/step and ratios, all measured in one run) and returns the rows.

``batchplate bench`` runs them all (``--only NAME`` one, ``--quick`` a rough check).
"""
