"""The ``refine`` command's engine: the run (:mod:`.run`), its two executors — per image on CPU
workers (:mod:`.images`), in batches on a device (:mod:`.batches`) — and what decides a mask
(:mod:`.fingerprint`)."""
from .run import MixedDirectory, RefineReport, RefineRequest, run_refine

__all__ = ["MixedDirectory", "RefineReport", "RefineRequest", "run_refine"]
