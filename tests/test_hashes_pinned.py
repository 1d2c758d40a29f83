"""Stored hashes do not move: the quickstart teacher's hash and one candidate's spec hash per method, each built
the way its driver builds it. A change that moves one of these makes every stored teacher or candidate
unreachable (a cache miss, a retrain): the values below were taken from the code before the restructuring of
issue 32 and must stay as they are, unless what a candidate is changes — then a new hash is what keeps an old
result from being taken for the new candidate. Issue 35 moved two: a taylor step carries its ranking (normalizer,
round_to), and a structured agp schedule the round_to its thinned widths keep."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from searchsvc.config import load_config
from searchsvc.methods.agp.driver import trial_spec as agp_spec
from searchsvc.methods.agp.variants import schedule_variants
from searchsvc.methods.grid.driver import grid_specs
from searchsvc.methods.n2n.env import removal_stage
from searchsvc.methods.rigl.driver import trial_spec as rigl_spec
from searchsvc.methods.sensitivity.driver import sensitivity_specs
from searchsvc.methods.taylor.driver import TrialJob, iteration_spec
from searchsvc.sweeps.sparse import CandidateJob
from storage import open_store
from workers.compression.agp import put_schedule
from workers.evaluation.spec import CandidateSpec
from workers.models.inputs import InputSpec
from workers.models.zoo import create_model
from workers.training.teacher import teacher_hash

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TEACHER = "82d9194c238045dd"  # the quickstart teacher (configs/quickstart.yaml)
PINNED = {"grid": "aeffb621987cbf0d", "n2n": "2629560287761d3c", "taylor": "163c31fa84dc001b",
          "agp": "c48198d7d05450ef", "rigl": "3cf736d84cce5b73", "sensitivity": "f19e817aaa907ef3"}


def _context(name: str) -> SimpleNamespace:
    """A driver's view of a config: the config, a teacher (hash and network) and the data's shape."""
    config = load_config(CONFIGS / name)
    synthetic = config.dataset.synthetic
    model = create_model(config.teacher.arch, synthetic.channels, synthetic.num_classes)
    return SimpleNamespace(config=config, teacher=SimpleNamespace(teacher_hash=TEACHER, model=model),
                           splits=SimpleNamespace(inputs=InputSpec.image(synthetic.channels, synthetic.image_size)))


def _job(context: SimpleNamespace, **extra) -> dict:
    config = context.config
    return dict(store=None, arch=config.teacher.base, teacher_hash=TEACHER, dataset=config.dataset,
                train=config.train, resources=config.resources, seed=config.seed, **extra)


def test_the_quickstart_teacher_hash_is_unchanged():
    config = load_config(CONFIGS / "quickstart.yaml")
    assert teacher_hash(config.teacher, config.dataset) == TEACHER


def test_a_grid_candidate_hash_is_unchanged():
    assert grid_specs(_context("grid-smoke.yaml"))[1].spec_hash == PINNED["grid"]


def test_an_n2n_candidate_hash_is_unchanged():
    context = _context("n2n-smoke.yaml")
    config = context.config
    base = CandidateSpec(arch=config.teacher.base, teacher=TEACHER, dataset=config.dataset, train=config.train,
                         method="n2n", seed=config.seed)
    assert removal_stage(("layer1.0", "layer2.0"), base).make_spec(np.array([1, 0])).spec_hash == PINNED["n2n"]


def test_a_taylor_candidate_hash_is_unchanged():
    context = _context("taylor-smoke.yaml")
    config = context.config
    job = TrialJob(**_job(context, teacher_val_accuracy=0.9, teacher_params=1000, teacher_channels=56,
                          search=config.search))
    sample = {"filters_per_iteration": 0.05, "lr": config.train.lr, "epochs": 1, "distill": True}
    assert iteration_spec(job, sample, parent=None).spec_hash == PINNED["taylor"]


def test_an_agp_candidate_hash_is_unchanged(tmp_path):
    context = _context("agp-smoke.yaml")
    variant = schedule_variants(context.config.search, context.teacher.model)[0]
    sample = {"variant": {"schedule": put_schedule(open_store(str(tmp_path)), variant["raw"])},
              "lr": context.config.train.lr, "epochs": context.config.train.epochs}
    assert agp_spec(CandidateJob(**_job(context)), sample).spec_hash == PINNED["agp"]


def test_a_rigl_candidate_hash_is_unchanged():
    context = _context("rigl-smoke.yaml")
    search = context.config.search
    job = SimpleNamespace(**_job(context), search=search)
    sample = {"alpha": search.alpha, "delta": search.delta, "dense_allocation": search.dense_allocation,
              "distribution": search.distribution, "static_topo": False, "lr": context.config.train.lr}
    assert rigl_spec(job, sample).spec_hash == PINNED["rigl"]


def test_a_sensitivity_candidate_hash_is_unchanged():
    context = _context("agp-smoke.yaml")
    context.config = load_config(CONFIGS / "agp-smoke.yaml", overrides=["method=sensitivity", "search={}"])
    assert sensitivity_specs(context, ["conv1.weight"])[0].spec_hash == PINNED["sensitivity"]
