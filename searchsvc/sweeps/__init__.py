"""What the Ray Tune methods share: the Tuner on the run's store, search spaces, trial reports as rows."""
