"""The one exception type of batchplate."""


class BatchPlateError(ValueError):
    """Structural misuse of a batch plate.

    Raised instead of returning a silently wrong number: a sample site outside
    the batch plate, a guide that couples data points, model and guide that
    disagree on the plate, nested or repeated batch plates, non-finite log
    weights, or a dynamic program under `vectorize_particles=True`. The
    message names the site, the plate and, where it applies, the datum.
    """
