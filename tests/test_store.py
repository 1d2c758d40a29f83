"""The artifact store contract, run against the local folder and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import pickle

import pyarrow as pa
import pytest

from searchsvc.reporting.table import read_results, write_results
from storage import (
    BucketNotFoundError,
    CorruptArtifactError,
    InvalidKeyError,
    KeyNotFoundError,
    LocalStore,
    S3Store,
    StoreAccessError,
    StoreError,
    StoreUnreachableError,
    WriteConflictError,
    open_store,
)


def test_bytes_round_trip(store):
    digest = store.put_bytes("runs/r1/blob.bin", b"\x00\x01payload")
    assert store.get_bytes("runs/r1/blob.bin") == b"\x00\x01payload"
    assert digest == hashlib.sha256(b"\x00\x01payload").hexdigest()
    assert store.exists("runs/r1/blob.bin")
    assert not store.exists("runs/r1/other.bin")


def test_write_once_same_content_is_idempotent(store):
    store.put_bytes("candidates/abc/spec.json", b"{}", write_once=True)
    store.put_bytes("candidates/abc/spec.json", b"{}", write_once=True)
    assert store.get_bytes("candidates/abc/spec.json") == b"{}"


def test_write_once_different_content_fails_and_keeps_the_original(store):
    store.put_bytes("candidates/abc/spec.json", b"first", write_once=True)
    with pytest.raises(WriteConflictError, match="candidates/abc/spec.json"):
        store.put_bytes("candidates/abc/spec.json", b"second", write_once=True)
    assert store.get_bytes("candidates/abc/spec.json") == b"first"


def test_plain_put_replaces(store):
    store.put_bytes("runs/r1/run.json", b"old")
    store.put_bytes("runs/r1/run.json", b"new")
    assert store.get_bytes("runs/r1/run.json") == b"new"


def test_list_by_prefix_is_recursive_and_sorted(store):
    for key in ["runs/b/x.json", "runs/a/evals/2.json", "runs/a/evals/1.json", "teachers/t/model.pt"]:
        store.put_bytes(key, b"1")
    assert store.list("runs/a/") == ["runs/a/evals/1.json", "runs/a/evals/2.json"]
    assert store.list("runs/") == ["runs/a/evals/1.json", "runs/a/evals/2.json", "runs/b/x.json"]
    assert len(store.list()) == 4
    assert store.list("nothing/") == []


def test_missing_key_is_a_clear_error(store):
    with pytest.raises(KeyNotFoundError, match="runs/none/config.yaml"):
        store.get_bytes("runs/none/config.yaml")


@pytest.mark.parametrize("key", ["../escape", "runs/../../etc/passwd", "/abs", "runs//x", "runs/x/", "a\\b", ""])
def test_keys_that_escape_their_prefix_are_rejected(store, key):
    with pytest.raises(InvalidKeyError):
        store.put_bytes(key, b"x")


def test_json_round_trip(store):
    store.put_json("runs/r/run.json", {"b": [1, 2.5], "a": None})
    assert store.get_json("runs/r/run.json") == {"a": None, "b": [1, 2.5]}


def test_parquet_round_trip_keeps_schema_and_values(store):
    table = pa.table({"spec_hash": ["a", "b"], "accuracy": [0.5, 0.75], "params": pa.array([10, 20], pa.int64())})
    store.put_table("runs/r/t.parquet", table)
    back = store.get_table("runs/r/t.parquet")
    assert back.schema == table.schema
    assert back.to_pylist() == table.to_pylist()


def test_results_table_is_ranked_best_first(store, make_row):
    rows = [
        make_row(spec_hash="low", status="ok", reward=0.1, accuracy=0.9, params=5),
        make_row(spec_hash="bad", status="invalid", reward=2.0, accuracy=0.0, params=1),
        make_row(spec_hash="high", status="ok", reward=0.7, accuracy=0.8, params=9),
    ]
    store.put_bytes("runs/r1/config.yaml", b"method: n2n\n")
    write_results(store, "r1", rows)
    assert read_results(store, "r1")["spec_hash"].to_pylist() == ["high", "low", "bad"]


def test_the_result_schema_is_the_result_rows_fields_in_order():
    """One home for the row: a field of ResultRow is a column, typed from its hint (adding one adds a column)."""
    import dataclasses

    from searchsvc.reporting.rows import ResultRow
    from searchsvc.reporting.table import RESULT_SCHEMA, arrow_schema

    names = [f.name for f in dataclasses.fields(ResultRow) if f.name != "extra"]  # extra: a run's own columns
    assert RESULT_SCHEMA.names == names
    assert names[:15] == ["spec_hash", "method", "run_id", "code_version", "status", "accuracy", "val_accuracy",
                          "params", "macs", "latency_ms", "compression", "reward", "wall_s", "worker", "artifact"]
    assert RESULT_SCHEMA.field("params").type == pa.int64() and RESULT_SCHEMA.field("cached").type == pa.bool_()
    assert RESULT_SCHEMA.field("accuracy").type == pa.float64() and RESULT_SCHEMA.field("error").type == pa.string()
    wider = dataclasses.make_dataclass("Wider", [("energy_mj", float | None)], bases=(ResultRow,), frozen=True)
    assert arrow_schema(wider).names == [*names, "energy_mj"]
    assert arrow_schema(wider).field("energy_mj").type == pa.float64()


def test_results_parquet_has_typed_columns_even_where_every_value_is_null(store):
    from searchsvc.reporting.rows import ResultRow

    row = ResultRow(spec_hash="a", method="grid", run_id="r2", code_version="v", status="invalid", accuracy=0.0,
                    val_accuracy=None, params=None, macs=None, latency_ms=None, compression=None, reward=-1.0,
                    wall_s=0.5, worker=None, artifact=None, device=None, latency_b256_ms=None, model_bytes=None,
                    cached=False, error="out of memory", removed="[]", widths="{}", finetuned_from=None,
                    parent_accuracy=None, within_budget=None)
    store.put_bytes("runs/r2/config.yaml", b"method: grid\n")
    write_results(store, "r2", [row.with_columns(order=1)])
    table = store.get_table("runs/r2/results.parquet")
    assert table.schema.field("params").type == pa.int64() and table.schema.field("macs").type == pa.int64()
    assert table.schema.field("parent_accuracy").type == pa.float64()  # all null, still a number column
    assert table.schema.field("within_budget").type == pa.bool_()
    assert table.schema.field("order").type == pa.int64()  # a run's own column, after the fixed ones
    assert table.to_pylist() == [{**row.to_data(), "order": 1}]


def test_manifest_detects_a_corrupt_file(store):
    store.put_bytes("teachers/t/model.pt", b"weights")
    store.put_bytes("teachers/t/meta.json", b"{}")
    files = store.write_manifest("teachers/t")
    assert set(files) == {"model.pt", "meta.json"}
    store.verify("teachers/t")
    assert store.get_verified("teachers/t", "model.pt") == b"weights"
    store.put_bytes("teachers/t/model.pt", b"weightz")  # bit rot, or a partial overwrite
    with pytest.raises(CorruptArtifactError, match="model.pt"):
        store.verify("teachers/t")
    with pytest.raises(CorruptArtifactError, match="model.pt"):
        store.get_verified("teachers/t", "model.pt")


def test_a_manifest_from_the_bytes_just_written_equals_one_read_back(store):
    files = {"model.pt": b"weights", "metrics.json": b'{"accuracy": 0.5}'}
    for name, data in files.items():
        store.put_bytes(f"candidates/a/{name}", data)
        store.put_bytes(f"candidates/b/{name}", data)
    assert store.write_manifest("candidates/a", files) == store.write_manifest("candidates/b")
    store.verify("candidates/a")
    store.put_bytes("candidates/a/model.pt", b"weightz")
    with pytest.raises(CorruptArtifactError, match="model.pt"):
        store.verify("candidates/a")


def test_verify_without_manifest_says_incomplete(store):
    store.put_bytes("teachers/t/model.pt", b"weights")
    with pytest.raises(KeyNotFoundError, match="manifest"):
        store.verify("teachers/t")


def test_large_file_round_trip_50_mb(store, tmp_path):
    """50 MB goes up in parts on S3 (8 MiB each) and comes back byte-identical; write-once holds."""
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(50 * 1000 * 1000))
    digest = store.put_file("candidates/big/model.pt", source, write_once=True)
    assert store.put_file("candidates/big/model.pt", source, write_once=True) == digest
    target = store.get_file("candidates/big/model.pt", tmp_path / "down" / "big.bin")
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(20 * 1000 * 1000))
    with pytest.raises(WriteConflictError):
        store.put_file("candidates/big/model.pt", other, write_once=True)


def test_store_survives_pickling(store):
    """Ray ships stores to actors by pickling them."""
    store.put_bytes("runs/r/a", b"1")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get_bytes("runs/r/a") == b"1"
    assert clone.uri == store.uri


# ---- S3-specific errors ---------------------------------------------------------------------------
@pytest.mark.s3
def test_missing_bucket_says_so(s3_env):
    with pytest.raises(BucketNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        open_store("s3://no-such-bucket/x", endpoint=s3_env.endpoint)


@pytest.mark.s3
def test_endpoint_down_is_a_clear_error(s3_env):
    from tests.conftest import free_port_pair

    endpoint = f"http://127.0.0.1:{free_port_pair()}"
    with pytest.raises(StoreUnreachableError, match="cannot reach S3 endpoint http://127.0.0.1"):
        open_store("s3://bucket/x", endpoint=endpoint, max_attempts=2)


@pytest.mark.s3
def test_wrong_credentials_are_access_denied_and_never_printed(s3_env, monkeypatch):
    bucket = s3_env.new_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(StoreAccessError) as caught:
        open_store(f"s3://{bucket}/x", endpoint=s3_env.endpoint, max_attempts=1)
    assert "wrong-secret-value" not in str(caught.value)
    assert s3_env.access_key not in str(caught.value)


@pytest.mark.s3
def test_missing_credentials_are_a_clear_error(s3_env, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreAccessError, match="credentials"):
        open_store("s3://bucket/x", endpoint=s3_env.endpoint, max_attempts=1)


@pytest.mark.s3
def test_endpoint_comes_from_boto3_environment(s3_env, monkeypatch):
    bucket = s3_env.new_bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint)
    store = open_store(f"s3://{bucket}/p")
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"


def test_endpoint_with_credentials_in_url_is_rejected():
    with pytest.raises(StoreError, match="credentials in the URL"):
        S3Store("bucket", endpoint="http://key:secret@127.0.0.1:9000", check=False)


@pytest.mark.parametrize("uri", ["s3://", "ftp://host/x", "file://remote-host/x"])
def test_bad_store_uris_are_rejected(uri):
    with pytest.raises(StoreError):
        open_store(uri)


def test_uri_forms_for_local_folders(tmp_path):
    by_path = open_store(str(tmp_path / "a"))
    by_uri = open_store((tmp_path / "a").as_uri())
    assert isinstance(by_path, LocalStore) and by_path.uri == by_uri.uri
    with pytest.raises(StoreError, match="does not exist"):
        open_store(str(tmp_path / "missing"), create=False)


def test_pyarrow_filesystem_addresses_the_same_keys(store):
    """Ray Tune writes through pyarrow: a file written there is a key in the store, and back."""
    import pyarrow.parquet as pq

    filesystem, base = store.arrow_filesystem()
    filesystem.create_dir(f"{base}/runs/r/state", recursive=True)
    pq.write_table(pa.table({"x": [1, 2]}), f"{base}/runs/r/state/t.parquet", filesystem=filesystem)
    assert "runs/r/state/t.parquet" in store.list("runs/r/")
    assert store.get_table("runs/r/state/t.parquet")["x"].to_pylist() == [1, 2]
    store.put_bytes("runs/r/note.txt", b"hi")
    with filesystem.open_input_stream(f"{base}/runs/r/note.txt") as handle:
        assert handle.read() == b"hi"


def test_listing_outside_the_store_is_rejected(tmp_path):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(InvalidKeyError):
        store.list("../")
    assert store.list("runs/x") == []


def test_store_options_are_passed_in_and_read_from_the_environment_only_at_the_edge(tmp_path, monkeypatch):
    from storage import StoreOptions, spool

    options = StoreOptions.from_env({"SEARCHSVC_STORE_RETRY_S": "7.5", "SEARCHSVC_SPOOL_DIR": str(tmp_path / "spool")})
    assert options == StoreOptions(7.5, tmp_path / "spool")
    assert spool.spool_dir(open_store(str(tmp_path / "s"), options=options)).parent == tmp_path / "spool"
    monkeypatch.setenv("SEARCHSVC_SPOOL_DIR", str(tmp_path / "ignored"))  # storage itself never reads it
    assert open_store(str(tmp_path / "t")).spool_root == StoreOptions().spool_root
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(StoreError, match="SEARCHSVC_STORE_RETRY_S"):
            StoreOptions.from_env({"SEARCHSVC_STORE_RETRY_S": bad})


def test_the_layout_builds_every_key_and_refuses_ids_that_would_escape():
    from storage import layout

    run_id = "20261126-000000.000-abc123"
    assert layout.run_file(run_id, "state/n2n.json") == f"runs/{run_id}/state/n2n.json"
    assert layout.candidate_file("0123456789abcdef", "model.pt") == "candidates/0123456789abcdef/model.pt"
    assert layout.manifest(layout.teacher("fedcba9876543210")) == "teachers/fedcba9876543210/manifest.json"
    for folder in (layout.run, layout.candidate, layout.teacher):
        for bad in ("..", "a/b", "", "x y"):
            with pytest.raises(InvalidKeyError, match=folder.what):
                folder(bad)
    keys = ["runs/b/run.json", "runs/a/config.yaml", "runs/a/run.json", "runs/loose", "teachers/t/x"]
    assert layout.run_ids(keys) == ["a", "b"]
