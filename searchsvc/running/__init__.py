"""One job from start to end: the run record, the recorder of result rows, stops and preflight checks."""
