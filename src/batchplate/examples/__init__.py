"""Runnable examples. Each module has ``NAME``, ``OBJECTIVES``, ``DEFAULTS`` and
``run(*, objective, num_particles, batch_size, steps, lr, seed, out_dir, progress, **options)``,
which ``batchplate run <name>`` calls."""
