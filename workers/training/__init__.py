"""Training and distillation: the step loop, its callbacks, CUDA graphs, teachers."""
