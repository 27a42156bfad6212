"""Runnable examples; each module has a ``main(argv)`` used by ``batchplate run``."""
