"""Where everything lives in the store. Every key is built here, and each id is checked here, once (`check_id`:
no key escapes its prefix); no other module spells a key or a stored file's name (tests/test_layout.py).

    runs/<run_id>/
        config.yaml                         the resolved config, written first and once: the run exists
        run.json                            status, teacher, counts and timings, rewritten as the run goes
        results.parquet                     the consolidated table
        evals/<spec_hash>.json              one row per evaluation, written once
        plots/trajectory.png, plots/sensitivity.png
        state/n2n.json, state/<stage>/checkpoint/, state/tune/   driver checkpoints for resume (n2n, RLlib, Tune)
        reports/<trial_id>-<spec_hash>.json Tune reports the store was down for (kept locally, recorded by resume)
        trials.json                         taylor: a summary per trial
        summaries/<spec_hash>-<kind>.csv    agp, rigl: sparsity and compute of each kept model
        sensitivity.csv, sensitivity.agp.yaml   sensitivity: its table and a starting agp schedule
    candidates/<spec_hash>/                 spec.json, model.pt (kept models), metrics.json, manifest.json
    candidates/<spec_hash>/int8-<key>/      model.onnx, int8.json, manifest.json: the int8 model of one quantize
                                            setting (key: QuantizeConfig.key(), or "qat")
    teachers/<teacher_hash>/                meta.json, model.pt, manifest.json
    teachers/<teacher_hash>/validation/     val.json, manifest.json: the validation accuracy of an older teacher
    teachers/<teacher_hash>/logits/         train.pt, manifest.json: the training split's logits
    schedules/<schedule_hash>.yaml          sparsity schedules, named by CandidateSpec.schedule
    summaries/<model_hash>-<kind>.csv       `searchsvc summary` of a candidate or a teacher

A folder with a manifest.json is complete: the manifest is written last, once.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.base import MANIFEST, ArtifactStore, check_id
from storage.errors import StoreError

RUNS, CANDIDATES, TEACHERS = "runs/", "candidates/", "teachers/"
SCHEDULES, SUMMARIES = "schedules/", "summaries/"

# runs/<run_id>/
CONFIG = "config.yaml"  # written first: the marker that the run exists
RECORD = "run.json"
RESULTS = "results.parquet"
EVALS, PLOTS, STATE, REPORTS = "evals", "plots", "state", "reports"
TRIALS = "trials.json"
TRAJECTORY_PLOT, SENSITIVITY_PLOT = "trajectory.png", "sensitivity.png"  # under plots/
N2N_STATE = "n2n.json"  # under state/: the stages n2n has done and their histories
TUNE_EXPERIMENT = "tune"  # under state/: Tune's experiment folder
PPO_CHECKPOINT = "checkpoint"  # under state/<stage>/: RLlib's checkpoint folder of an n2n stage
RLLIB_CHECKPOINT = "rllib_checkpoint.json"  # RLlib's own file in it, written with the checkpoint
POLICY, POLICY_WEIGHTS = "policy", "policy.pt"  # under state/<stage>/: the stage's trained policy, its weights
SENSITIVITY_TABLE, SENSITIVITY_SCHEDULE = "sensitivity.csv", "sensitivity.agp.yaml"
# candidates/<spec_hash>/ and teachers/<teacher_hash>/
SPEC, MODEL, METRICS, META = "spec.json", "model.pt", "metrics.json", "meta.json"
INT8_MODEL, INT8_RECORD = "model.onnx", "int8.json"  # in an int8-<key>/ folder
VALIDATION, VAL_RECORD = "validation", "val.json"  # teachers/<hash>/validation/val.json
LOGITS, TRAIN_LOGITS = "logits", "train.pt"  # teachers/<hash>/logits/train.pt


@dataclass(frozen=True)
class Folder:
    """One kind of folder: `folder(id)` is its key (the id checked), `folder.file(id, name)` a file in it."""

    root: str  # "runs/", ...
    what: str  # what the id is, for the error message

    def __call__(self, value: str) -> str:
        return f"{self.root}{check_id(value, self.what)}"

    def file(self, value: str, name: str) -> str:
        """`<root><id>/<name>` (name may hold folders: `state/n2n.json`, `logits/meta.json`)."""
        return f"{self(value)}/{name}"


run = Folder(RUNS, "run id")  # runs/<run_id>
candidate = Folder(CANDIDATES, "spec hash")  # candidates/<spec_hash>
teacher = Folder(TEACHERS, "teacher hash")  # teachers/<teacher_hash>
run_file, candidate_file, teacher_file = run.file, candidate.file, teacher.file


def file_in(folder: str, name: str) -> str:
    """The file `name` in the folder key `folder` (one this module built: an int8 folder, a teacher's logits)."""
    return f"{folder}/{name}"


def manifest(prefix: str) -> str:
    """The manifest of the folder `prefix`."""
    return file_in(prefix, MANIFEST)


# ---- runs/<run_id>/ ---------------------------------------------------------------------------------------
def run_config(run_id: str) -> str:
    """runs/<run_id>/config.yaml: the resolved config, written first and once."""
    return run_file(run_id, CONFIG)


def run_record(run_id: str) -> str:
    """runs/<run_id>/run.json: status, teacher, counts and timings."""
    return run_file(run_id, RECORD)


def run_results(run_id: str) -> str:
    """runs/<run_id>/results.parquet: the consolidated table."""
    return run_file(run_id, RESULTS)


def evals_prefix(run_id: str) -> str:
    """runs/<run_id>/evals/: the prefix that lists a run's evaluations."""
    return run_file(run_id, f"{EVALS}/")


def eval_row(run_id: str, spec_hash: str) -> str:
    """runs/<run_id>/evals/<spec_hash>.json: one evaluation's row."""
    return f"{evals_prefix(run_id)}{check_id(spec_hash, 'spec hash')}.json"


def plots_prefix(run_id: str) -> str:
    """runs/<run_id>/plots/: the prefix that lists a run's plots."""
    return run_file(run_id, f"{PLOTS}/")


def run_plot(run_id: str, name: str) -> str:
    """runs/<run_id>/plots/<name> (TRAJECTORY_PLOT, SENSITIVITY_PLOT)."""
    return f"{plots_prefix(run_id)}{check_id(name, 'plot name')}"


def run_state(run_id: str, name: str) -> str:
    """runs/<run_id>/state/<name>: a driver's checkpoint (N2N_STATE, an n2n stage, TUNE_EXPERIMENT)."""
    return run_file(run_id, f"{STATE}/{check_id(name, 'state name')}")


def ppo_checkpoint(run_id: str, stage: str) -> str:
    """runs/<run_id>/state/<stage>/checkpoint: the folder RLlib checkpoints an n2n stage's PPO to."""
    return file_in(run_state(run_id, stage), PPO_CHECKPOINT)


def trained_policy(run_id: str, stage: str) -> str:
    """runs/<run_id>/state/<stage>/policy: an n2n stage's trained policy (POLICY_WEIGHTS + manifest), written
    once the stage is done: what `search.policy_from` starts another run from."""
    return file_in(run_state(run_id, stage), POLICY)


def reports_prefix(run_id: str) -> str:
    """runs/<run_id>/reports/: the prefix that lists the Tune reports kept while the store was down."""
    return run_file(run_id, f"{REPORTS}/")


def trial_report(run_id: str, trial_id: str, spec_hash: str) -> str:
    """runs/<run_id>/reports/<trial_id>-<spec_hash>.json: one Tune report kept while the store was down."""
    return f"{reports_prefix(run_id)}{check_id(trial_id, 'trial id')}-{check_id(spec_hash, 'spec hash')}.json"


def run_trials(run_id: str) -> str:
    """runs/<run_id>/trials.json: taylor's summary per trial."""
    return run_file(run_id, TRIALS)


def summaries_prefix(run_id: str) -> str:
    """runs/<run_id>/summaries/: the prefix of a sparse sweep's model summaries."""
    return run_file(run_id, SUMMARIES)


def run_summary(run_id: str, spec_hash: str, kind: str) -> str:
    """runs/<run_id>/summaries/<spec_hash>-<kind>.csv: a kept model's summary of one kind."""
    return f"{summaries_prefix(run_id)}{_summary_name(spec_hash, kind, 'spec hash')}"


def sensitivity_table(run_id: str) -> str:
    """runs/<run_id>/sensitivity.csv: the sensitivity driver's table."""
    return run_file(run_id, SENSITIVITY_TABLE)


def sensitivity_schedule(run_id: str) -> str:
    """runs/<run_id>/sensitivity.agp.yaml: the agp schedule the sensitivity driver proposes."""
    return run_file(run_id, SENSITIVITY_SCHEDULE)


def run_exists(store: ArtifactStore, run_id: str) -> bool:
    """Whether the store holds run `run_id`: its config, written first (a run stopped before its run.json was
    written exists, and resumes)."""
    return store.exists(run_config(run_id))


# ---- candidates/<spec_hash>/ and teachers/<teacher_hash>/ ---------------------------------------------------
def candidate_spec(spec_hash: str) -> str:
    """candidates/<spec_hash>/spec.json."""
    return candidate_file(spec_hash, SPEC)


def candidate_model(spec_hash: str) -> str:
    """candidates/<spec_hash>/model.pt (kept models only)."""
    return candidate_file(spec_hash, MODEL)


def candidate_metrics(spec_hash: str) -> str:
    """candidates/<spec_hash>/metrics.json."""
    return candidate_file(spec_hash, METRICS)


def int8_folder(spec_hash: str, key: str) -> str:
    """candidates/<spec_hash>/int8-<key>: the int8 model of one quantize setting (QuantizeConfig.key(), "qat")."""
    return candidate_file(spec_hash, f"int8-{check_id(key, 'quantize setting')}")


def teacher_meta(teacher_hash: str) -> str:
    """teachers/<teacher_hash>/meta.json."""
    return teacher_file(teacher_hash, META)


def teacher_model(teacher_hash: str) -> str:
    """teachers/<teacher_hash>/model.pt."""
    return teacher_file(teacher_hash, MODEL)


def teacher_validation(teacher_hash: str) -> str:
    """teachers/<teacher_hash>/validation: a teacher's validation accuracy recorded after it (VAL_RECORD)."""
    return teacher_file(teacher_hash, VALIDATION)


def teacher_val_record(teacher_hash: str) -> str:
    """teachers/<teacher_hash>/validation/val.json."""
    return file_in(teacher_validation(teacher_hash), VAL_RECORD)


def teacher_logits(teacher_hash: str) -> str:
    """teachers/<teacher_hash>/logits: a teacher's logits of the training split (TRAIN_LOGITS)."""
    return teacher_file(teacher_hash, LOGITS)


def teacher_train_logits(teacher_hash: str) -> str:
    """teachers/<teacher_hash>/logits/train.pt."""
    return file_in(teacher_logits(teacher_hash), TRAIN_LOGITS)


# ---- store-wide -----------------------------------------------------------------------------------------
def schedule(schedule_hash: str) -> str:
    """schedules/<schedule_hash>.yaml: a sparsity schedule, stored once under its hash."""
    return f"{SCHEDULES}{check_id(schedule_hash, 'schedule hash')}.yaml"


def store_summary(model_hash: str, kind: str) -> str:
    """summaries/<model_hash>-<kind>.csv: `searchsvc summary` of a candidate or a teacher."""
    return f"{SUMMARIES}{_summary_name(model_hash, kind, 'model hash')}"


def _summary_name(model_hash: str, kind: str, what: str) -> str:
    return f"{check_id(model_hash, what)}-{check_id(kind, 'summary kind')}.csv"


def run_ids(keys: list[str]) -> list[str]:
    """The run ids among `keys` listed under runs/, sorted (ids start with a UTC timestamp: oldest first)."""
    return sorted({key.split("/")[1] for key in keys if key.startswith(RUNS) and key.count("/") >= 2})


def list_runs(store: ArtifactStore) -> list[str]:
    """Run ids in the store, oldest first (ids start with a UTC timestamp)."""
    return run_ids(store.list(RUNS))


def latest_run(store: ArtifactStore) -> str:
    """The newest run id; StoreError if the store holds none."""
    runs = list_runs(store)
    if not runs:
        raise StoreError(f"{store.uri} holds no runs yet: start one with `searchsvc run CONFIG`")
    return runs[-1]


def latest_run_with_results(store: ArtifactStore) -> tuple[str, int]:
    """The newest run that has a results table, and how many newer runs have none (failed or stopped before their
    first result, or just started): what `searchsvc results` shows by default. The newest run, and 0, when no run
    has results yet; StoreError if the store holds no run. One listing of runs/."""
    keys = store.list(RUNS)
    runs = run_ids(keys)
    if not runs:
        raise StoreError(f"{store.uri} holds no runs yet: start one with `searchsvc run CONFIG`")
    with_results = {key.split("/")[1] for key in keys if key.count("/") == 2 and key.endswith(f"/{RESULTS}")}
    for newer, run_id in enumerate(reversed(runs)):
        if run_id in with_results:
            return run_id, newer
    return runs[-1], 0
