"""Runnable examples, each trained by `batchplate run <name>`.

Each public module has `NAME`, `OBJECTIVES`, an `Options` dataclass (the
keywords of its `run()` with their defaults, also listed in `DEFAULTS`) and
`run(**options)`, which trains, saves the figures under `out_dir` and returns
the metrics. Private modules (`_runner`, `_common`, `_*_programs`,
`_pcfg_grammar`) hold what the examples share and their larger pieces.
"""
