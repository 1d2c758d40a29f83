"""What the `searchsvc` commands share: the store flags, opening the store, checking an output path early."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Callable, NoReturn

from core.errors import SearchsvcError
from storage import (
    DEFAULT_STORE,
    ArtifactStore,
    InvalidKeyError,
    StoreError,
    StoreOptions,
    check_id,
    local_folder,
    open_store,
)
from storage.local import local_root

STORE_HELP = (f"artifact store: a folder, file:///abs/dir or s3://bucket/prefix (default: the config's store:, "
              f"else {DEFAULT_STORE})")
ENDPOINT_HELP = ("S3 endpoint URL for s3:// stores, e.g. http://127.0.0.1:9000 for MinIO (default: boto3's "
                 "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS). Credentials come only from boto3's chain: "
                 "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, or an instance role")


class Parser(argparse.ArgumentParser):
    """argparse's parser, its errors one `searchsvc: error:` line (no usage block: `--help` shows it), exit 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]  # "searchsvc results" -> "results"; "" for the top level
        where = f"{command}: " if command else ""
        self.exit(2, f"searchsvc: error: {where}{' '.join(message.split())}\n")


def id_arg(what: str) -> Callable[[str], str]:
    """An argparse `type` for a run id or spec hash: checked in full (empty, too long, a trailing newline, a
    '/') before any file-system or store call."""
    def parse(text: str) -> str:
        try:
            return check_id(text, what)
        except InvalidKeyError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def open_for(args: argparse.Namespace, uri: str, create: bool = False) -> ArtifactStore:
    """The store at `uri` with this command's endpoint and the environment's store options (read here, once)."""
    return open_store(uri, endpoint=args.s3_endpoint, create=create, options=StoreOptions.from_env())


def outside_store(output: Path, store: str, flag: str) -> None:
    """SearchsvcError if `output` resolves (symbolic links followed) into the local store `store`: the store
    is written once, by searchsvc, under manifests; an output file there would replace a record. An s3://
    store cannot hold a local file."""
    try:
        folder = local_folder(store)
    except StoreError:
        return  # not a store URI: opening it says so, in one line
    if folder is None:
        return
    root, target = local_root(folder), output.resolve()
    if target == root or root in target.parents:
        raise SearchsvcError(f"{flag}: {output} is inside the store {store}; write outputs outside it")


def add_store(sub: argparse.ArgumentParser, from_config: bool = False) -> None:
    """--store and --s3-endpoint; `from_config`: the default is the config's `store:`."""
    if from_config:
        sub.add_argument("--store", help=STORE_HELP)
    else:
        sub.add_argument("--store", default=DEFAULT_STORE, help=f"artifact store (default {DEFAULT_STORE})")
    sub.add_argument("--s3-endpoint", help=ENDPOINT_HELP)


def add_set(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                     help="override a config key, e.g. --set train.epochs=3 --set dataset.subset=0.1 "
                          "(value parsed as YAML; repeatable)")


def output_path(path: str, flag: str, suffixes: tuple[str, ...] = (), create_folders: bool = False,
                store: str | None = None) -> Path:
    """A file a command will write, checked before any work is done: outside the store `store` (a URI), not a
    folder, a name the file system takes, in a folder that exists (or, with `create_folders`, can be made)
    and can be written."""
    output = Path(path)
    if suffixes and output.suffix not in suffixes:
        raise SearchsvcError(f"{flag}: {path}: use a {', '.join(suffixes)} file name")
    longest = max(len(part.encode()) for part in output.parts) if output.parts else 0
    if longest > 255:  # checked first: the file system refuses even to look such a name up
        raise SearchsvcError(f"{flag}: the file name is too long ({longest} bytes; at most 255)")
    if store is not None:
        outside_store(output, store, flag)
    if output.is_dir():
        raise SearchsvcError(f"{flag}: {path} is a folder; give a file name")
    folder = output.parent
    while create_folders and not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the nearest folder that exists: the rest is created
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise SearchsvcError(f"{flag}: folder {folder} {what}")
    if not os.access(folder, os.W_OK):
        raise SearchsvcError(f"{flag}: cannot write into {folder}")
    try:  # what os.access cannot tell (/proc, a read-only mount for root): try it now, before any work
        if folder != output.parent:
            os.rmdir(tempfile.mkdtemp(dir=folder))  # the missing folders will be made in `folder`
        elif not output.exists():
            output.open("xb").close()
            output.unlink()
    except OSError as err:
        raise SearchsvcError(f"{flag}: cannot write {path} ({err.strerror})") from None
    return output
