"""Commands beside the merge pipeline: verify (an independent float64 recomputation of a finished merge),
inspection (how large an adapter's change is against the gap between two bases), demo (a merge on a tiny model)."""
