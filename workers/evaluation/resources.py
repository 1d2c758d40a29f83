"""What one candidate evaluation gets from Ray (the `resources:` section of a job config)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Resources:
    """Per-evaluation resources; several small candidates share one GPU through fractional shares."""

    gpus_per_eval: float = field(default=0.25, metadata={"min": 0, "help": "GPU share per evaluation (0.25: 4/GPU)"})
    cpus_per_eval: float = field(default=1.0, metadata={"gt": 0, "help": "CPU cores per evaluation"})
    max_concurrent: int | None = field(default=None, metadata={"min": 1, "help": "cap on evaluations in flight"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile each candidate's training step (GPU; pays beyond about 60-110 epochs: benchmarks/README.md)"})
    cuda_graph: bool = field(default=True, metadata={
        "help": "replay each candidate's training step as one CUDA graph where it is static (GPU, no augmentation, "
                "no per-step callbacks): small students launch-bound otherwise (benchmarks/README.md, On a GPU)"})
