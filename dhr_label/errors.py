"""Errors a user can act on: each names the image, the file, what was expected and found."""
from __future__ import annotations


class DHRLabelError(Exception):
    """Base class of every error dhr-label reports to a user (never shown as a traceback)."""


class InputError(DHRLabelError):
    """Bad input for one image: the run reports it, counts it and goes on.

    Parameters
    ----------
    image_id : str
        The image the problem belongs to.
    source : str
        The file (and dataset inside it) where the problem was found, e.g. ``cams.h5:/x/cam``.
    problem : str
        What is wrong, stating expected vs found.
    """

    def __init__(self, image_id: str, source: str, problem: str):
        self.image_id = image_id
        self.source = source
        self.problem = problem
        super().__init__(f"{image_id}: {source}: {problem}")

    def __reduce__(self):
        # Rebuild from the three fields, so the error survives a trip between processes.
        return (type(self), (self.image_id, self.source, self.problem))


class FileLevelError(DHRLabelError):
    """A fault that concerns a whole file or directory: the run cannot start or go on."""
