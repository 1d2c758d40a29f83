"""How a candidate becomes a measured, stored model, and the Ray actor pool that does it."""
