"""One module per pipeline stage; each exposes `run(rt, force=False) -> summary dict`."""
