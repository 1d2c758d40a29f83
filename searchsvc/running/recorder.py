"""The driver's side of evaluation: candidate specs in, result rows out, each evaluation recorded once.

Every driver records through a `Recorder`: it turns metrics into result rows (compression, reward),
writes `runs/<id>/evals/<spec_hash>.json` once per candidate, keeps `results.parquet` current, and
shows a progress bar with the best result so far. An `Evaluator` is a Recorder that also owns the
actor pool (grid, n2n); Tune methods evaluate inside their trials and record the trials' reports.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

from searchsvc.budget import budget_of, measures_of
from searchsvc.reporting.rows import ResultRow, stored_rows
from searchsvc.rewards import INVALID_REWARD, RewardForm, compression_ratio
from searchsvc.running import stopping
from searchsvc.running.job import RunContext
from searchsvc.running.reward_rule import RewardRule
from searchsvc.version import code_version
from storage import StoreUnreachableError, layout, spool
from storage.base import json_bytes as store_json_bytes
from storage.base import sealed
from workers.evaluation.evaluate import UnsavedResult
from workers.evaluation.pool import EvalPool
from workers.evaluation.spec import CandidateSpec
from workers.measurement.measure import count_parameters
from workers.measurement.metrics import CandidateMetrics
from workers.measurement.run_measures import run_columns
from workers.training.distill import cache_fits
from workers.training.teacher import ensure_train_logits
from workers.training.train import augments, resolve_device

log = logging.getLogger(__name__)
RESULTS_EVERY_S = 5.0  # seconds between rewrites of results.parquet while the run goes


class Recorder:
    """The rows of a run: each recorded once (evals/<hash>.json), results.parquet kept current, a progress bar."""

    size = "params"  # the metric compression and reward count (a sparse method counts non-zero parameters)

    def __init__(self, context: RunContext, reward_form: RewardForm = "c_2_minus_c", total: int | None = None,
                 reward_size: str | None = None, penalise_over_budget: bool = False) -> None:
        """`reward_size` (default: `size`): what the reward's compression counts: "params", "macs" or
        "latency_ms" (at the budget's latency setting, else torch at batch 1; the teacher's is timed here).
        `penalise_over_budget`: an over-budget candidate's reward is scaled by `Budget.overshoot` (N2N)."""
        self.context = context
        self.teacher_params = count_parameters(context.teacher.model)  # what compression is counted against
        self.budget = budget_of(context.config.search)
        self.rewards = RewardRule(context.teacher, context.splits, context.config.device, reward_form,
                                  reward_size or self.size, self.budget, penalise_over_budget)
        if self.rewards.size == "latency_ms":  # timed by this driver: recorded, as the rewards depend on it
            context.summary.update(teacher_reward_latency_ms=self.rewards.teacher_size)
        self.teacher_accuracy = context.teacher.test_accuracy  # reported beside the candidates
        self.started = time.perf_counter()
        self._last_write = 0.0
        self._store_down = False  # set when the store stayed unreachable: nothing more is written
        self.bar = tqdm(total=total, desc="candidates", unit="eval", disable=not context.progress,
                        dynamic_ncols=True)
        if context.resumed:
            self._preload()

    @property
    def rows(self) -> dict[str, ResultRow]:
        """spec_hash → row of this run, in the order recorded (the run's own: RunContext.rows)."""
        return self.context.rows

    def _preload(self) -> None:
        """A resumed run: the evaluations it already recorded count as done and are not sent again. Each is
        verified first (`stored_rows`): one that fails stops the resume in one line naming it, before it can
        rank or enter results.parquet (the file is write-once: remove it, and resume evaluates it again)."""
        for row in stored_rows(self.context.store, self.context.run_id):
            self.rows[row.spec_hash] = row
            self.bar.update(1)
        log.info("resumed run %s: %d evaluations already recorded", self.context.run_id, len(self.rows))

    @property
    def evaluations(self) -> int:
        """Candidates trained for this run."""
        return sum(not row.cached for row in self.rows.values())

    @property
    def cache_hits(self) -> int:
        """Candidates this run found in the store, untrained."""
        return sum(row.cached for row in self.rows.values())

    def record(self, spec: CandidateSpec, metrics: CandidateMetrics, cached: bool,
               unsaved: UnsavedResult | None = None, **extra: Any) -> ResultRow:
        """Add a candidate's row (plus `extra` columns) to the run; a candidate already recorded keeps its row.

        `unsaved`: a worker could not store the candidate (the store is down): its files are kept locally
        with the row, then the run stops."""
        if spec.spec_hash in self.rows:
            return self.rows[spec.spec_hash]
        order = len(self.rows) + 1  # 1, 2, ... as recorded
        # the run's own measurements (a budget's latency probe, int8) sit in the row: compare and the report
        # judge a budget by the row, as the run did
        columns = {**run_columns(metrics), **self.columns(spec, metrics), "order": order, **extra}  # later wins
        row = self.row(spec, metrics, cached).with_columns(**columns)
        self.rows[row.spec_hash] = row
        self._store_row(row, unsaved)
        self._progress()
        if time.perf_counter() - self._last_write > RESULTS_EVERY_S:
            self.flush()
        stopping.check()  # SIGTERM: stop after this result is recorded
        return row

    def _store_row(self, row: ResultRow, unsaved: UnsavedResult | None) -> None:
        """evals/<hash>.json, once, sealed (it carries the checksum of its content: no manifest covers it); if the
        store stays unreachable the row (and the candidate's unsaved files) are kept on local disk and the run
        stops with a message that says where (`searchsvc resume` uploads them)."""
        store, key = self.context.store, layout.eval_row(self.context.run_id, row.spec_hash)
        sealed_row = sealed(row.to_data())
        cause: StoreUnreachableError | None = unsaved
        if cause is None:
            try:
                store.put_json(key, sealed_row, write_once=True)
                return
            except StoreUnreachableError as err:
                cause = err
        for name, data in (unsaved.files if unsaved else {}).items():
            spool.keep_bytes(store, name, data)
        spool.keep_bytes(store, key, store_json_bytes(sealed_row))
        raise self._store_down_error(cause, f"the finished result is kept in {spool.spool_dir(store)}") from None

    def store_down(self, err: StoreUnreachableError) -> StoreUnreachableError:
        """The run's error once the store stayed down outside a row write (a Tune sweep's trials, its state):
        the store's own words, where finished results are kept, and how to resume."""
        if "searchsvc resume" in str(err):  # already said by a row write
            return err
        folder = spool.spool_dir(self.context.store)
        kept = f"finished results are kept in {folder}" if folder.exists() and any(folder.rglob("*")) else \
            "every recorded result is stored"
        return self._store_down_error(err, kept)

    def _store_down_error(self, err: StoreUnreachableError, kept: str) -> StoreUnreachableError:
        """Stop writing, and say how the run goes on once the store is back."""
        self._store_down = True
        return StoreUnreachableError(f"{err}; {kept}. Once the store is back, `searchsvc resume --store "
                                     f"{self.context.store.uri} --run {self.context.run_id}` continues the run")

    def row(self, spec: CandidateSpec, m: CandidateMetrics, cached: bool) -> ResultRow:
        """A results-table row from a candidate's metrics."""
        ok = m.status == "ok"
        size = m.get(self.size)
        return ResultRow(
            spec_hash=spec.spec_hash, method=self.context.config.method, run_id=self.context.run_id,
            code_version=code_version(), status=m.status, accuracy=m.accuracy, val_accuracy=m.val_accuracy,
            params=m.params, macs=m.macs, latency_ms=m.latency_ms,
            compression=compression_ratio(self.teacher_params, size) if ok else None,
            reward=self.rewards.of(m) if ok else INVALID_REWARD,  # validation decides, test reports
            wall_s=m.wall_s, worker=m.worker, artifact=m.artifact, device=m.device,
            latency_b256_ms=m.latency_b256_ms, model_bytes=m.model_bytes, cached=cached, error=m.error,
            removed=json.dumps(list(spec.removed)), widths=json.dumps(dict(spec.widths)),
            finetuned_from=spec.init,  # built from this candidate; its accuracy is kept beside
            parent_accuracy=self.rows[spec.init].accuracy if spec.init in self.rows else None,
            within_budget=self.budget.within(m.get) if self.budget is not None and ok else None,
        )

    def columns(self, spec: CandidateSpec, metrics: CandidateMetrics) -> dict[str, Any]:
        """A method's own columns of a candidate's row, after the fixed ones (none here)."""
        return {}

    def _progress(self) -> None:
        best = max(self.rows.values(), key=lambda r: r.reward)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(evals_min=f"{60 * len(self.rows) / elapsed:.1f}", best_reward=f"{best.reward:.3f}",
                             best_x=f"{best.compression or 0:.2f}", best_val=f"{best.val_accuracy or 0:.4f}",
                             cache=self.cache_hits)

    def flush(self) -> None:
        """Rewrite results.parquet from every row so far (not while the store is down: resume rebuilds it)."""
        if self._store_down:
            return
        try:
            self.context.write_results()
        except StoreUnreachableError as err:
            raise self._store_down_error(err, "every recorded result is stored") from None
        self._last_write = time.perf_counter()

    def close(self) -> None:
        """Write the final table and report the counts to the run."""
        self.flush()
        self.bar.close()
        self.context.summary.update(evaluations=self.evaluations, cache_hits=self.cache_hits)


def prepare_teacher_logits(context: RunContext) -> None:
    """Compute the teacher's training-split logits once, before workers look them up (distillation only)."""
    train, task = context.config.train, context.teacher.task
    if train.distill.alpha > 0 and not augments(train, context.splits.inputs) and task.distill_on == "prediction" \
            and cache_fits(context.teacher.model, context.splits, task.output):
        ensure_train_logits(context.store, context.teacher, context.splits, resolve_device(context.config.device))


class Evaluator(Recorder):
    """Evaluate specs through the actor pool and record them as rows of the run."""

    def __init__(self, context: RunContext, reward_form: RewardForm = "c_2_minus_c", total: int | None = None,
                 pool: EvalPool | None = None, **recorder: Any) -> None:
        super().__init__(context, reward_form, total, **recorder)
        prepare_teacher_logits(context)
        self.pool = pool or EvalPool(context.store, context.teacher.teacher_hash, context.config.dataset,
                                     context.config.resources, on_wait=stopping.check,
                                     measures=measures_of(context.config),
                                     builder=context.builder)

    def evaluate(self, specs: Iterable[CandidateSpec]) -> list[ResultRow]:
        """Rows for `specs`, in order (evaluated concurrently; repeats within the run are free)."""
        specs = list(specs)
        for _ in self.stream(specs):
            pass
        return [self.rows[s.spec_hash] for s in specs]

    def stream(self, specs: Iterable[CandidateSpec]) -> Iterator[ResultRow]:
        """Rows as candidates finish; a spec already evaluated in this run is not sent again."""
        fresh = [s for s in dict.fromkeys(specs) if s.spec_hash not in self.rows]
        for outcome in self.pool.map_unordered(fresh):
            yield self.record(outcome.spec, outcome.metrics, outcome.cached, unsaved=outcome.unsaved)

    def close(self) -> None:
        """Write the final table, stop the actors, report counts to the run."""
        super().close()
        self.context.summary.update(workers_lost=self.pool.lost, workers_replaced=self.pool.replaced)
        self.pool.shutdown()


