"""The run folder: one place for a trained model and everything needed to trust and reuse it.

    RUN_DIR/config.json          model name, model config, train config, data description (JSON)
    RUN_DIR/model.safetensors    latest weights (safetensors, never pickle)
    RUN_DIR/checkpoint.safetensors  weights + optimiser + RNG state, with the trainer state as JSON metadata
    RUN_DIR/metrics.jsonl        one JSON record per epoch and split
    RUN_DIR/eval.json            the latest `elbolab eval` (any split)
    RUN_DIR/evaluations/*.json   every evaluation, one file each (split, K, examples, time), never overwritten
    RUN_DIR/manifest.json        seed, package versions, git hash, hardware
    RUN_DIR/figures/*.png, RUN_DIR/index.html, RUN_DIR/tensorboard/
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from elbolab.errors import CheckpointError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
BEST_WEIGHTS = "model.best.safetensors"  # with --keep-best: the weights of the best validation ELBO
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
EVALUATIONS = "evaluations"
MANIFEST = "manifest.json"
FIGURES = "figures"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")
_STRERRORS = {os.strerror(code): code for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO,
                                                   errno.EFBIG)}


def _write_error(error: BaseException, path: Path) -> OSError | None:
    """A failed write as ``OSError(errno, strerror, path)`` naming the file the user knows (not a temporary), or None
    when ``error`` is not an I/O failure. Python's own write errors often carry no file name, and safetensors'
    SafetensorError carries the OS error only in its text ("I/O error: No space left on device (os error 28)")."""
    if isinstance(error, OSError):
        code = error.errno
    elif type(error).__name__ == "SafetensorError":
        text = str(error)
        found = _OS_ERROR_IN_TEXT.search(text)
        code = int(found.group(1)) if found else next((c for s, c in _STRERRORS.items() if s in text), None)
    else:
        return None
    if code is None:
        return None
    return OSError(code, os.strerror(code), str(path))


@contextmanager
def writing(path: Path):
    """Turn a failed write of ``path`` (a full disk, a read-only folder) into one ``OSError`` naming ``path``."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - converted only when it is an I/O failure
        converted = _write_error(error, Path(path))
        if converted is None:
            raise
        raise converted from error


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves half a file.

    The file gets the permissions of any other file the user creates (0666 less the umask; mkstemp's are 0600).
    A temporary file left by a killed process is removed by ``remove_stale_temporaries``. A failed write (a full
    disk: safetensors' error or Python's) raises one ``OSError`` naming ``path``; the previous file is intact."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Delete the ``.NAME.*.tmp`` files that ``atomic_write`` leaves only when its process was killed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


class RunLock:
    """An exclusive lock on a run folder while a process trains in it (``fcntl.flock``, released by the OS when
    the process ends, so a crash never leaves the folder locked)."""

    NAME = ".elbolab.lock"

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.NAME
        self._file = None

    def acquire(self) -> RunLock:
        import fcntl

        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise CheckpointError(
                f"{self.path.parent} is in use: {holder} is training in it; wait for it to finish, or choose "
                "another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


def write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def save_evaluation(run_dir: Path, result: dict) -> Path:
    """Keep an evaluation: a new file in RUN_DIR/evaluations named by split, K, examples and time (never replacing
    another), and eval.json, the latest. Returns the new file."""
    folder = Path(run_dir) / EVALUATIONS
    folder.mkdir(exist_ok=True)
    log_px = result.get("log_px", {})
    stamp = result["evaluated_at"].replace(":", "").replace("-", "").replace("+0000", "Z")
    stem = f"{result.get('split', 'test')}-K{log_px.get('k', 0)}-n{log_px.get('n_examples', 0)}-{stamp}"
    for attempt in range(1000):
        path = folder / (f"{stem}.json" if attempt == 0 else f"{stem}-{attempt + 1}.json")
        try:
            with open(path, "x") as f:  # exclusive: two evaluations in the same second keep both
                json.dump(result, f, indent=2, sort_keys=True)
                f.write("\n")
            break
        except FileExistsError:
            continue
        except OSError as error:  # a full disk: no half-written evaluation, and the error names the file
            path.unlink(missing_ok=True)
            raise OSError(error.errno, error.strerror, str(path)) from error
    write_json(Path(run_dir) / EVAL, result)
    return path


def read_evaluations(run_dir: Path) -> list[dict]:
    """Every kept evaluation of a run, oldest first (unreadable files are skipped); an older run's lone eval.json
    counts as one."""
    records = []
    for path in sorted((Path(run_dir) / EVALUATIONS).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            records.append(record)
    if not records and (Path(run_dir) / EVAL).is_file():
        try:
            record = json.loads((Path(run_dir) / EVAL).read_text())
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict):
            records.append(record)
    return sorted(records, key=lambda r: str(r.get("evaluated_at", "")))


def latest_per_split(records: list[dict]) -> dict[str, dict]:
    """The newest evaluation of each split, test first."""
    latest = {}
    for record in records:  # oldest first: later ones replace earlier ones
        latest[record.get("split", "test")] = record
    order = {"test": 0, "val": 1, "train": 2}
    return dict(sorted(latest.items(), key=lambda item: order.get(item[0], 3)))


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"expected {path} to exist; is {path.parent} a run folder written by 'elbolab train'?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it or train again") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    # safetensors refuses views sharing memory and non-contiguous tensors: store compact copies.
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    meta = {"json": json.dumps(metadata)} if metadata is not None else None
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def model_config_metadata(model_name: str, model_config: dict) -> dict:
    """What weights files carry to tie them to their config.json: the model's name, its model config (as JSON) and
    a fingerprint, the sha256 of both in canonical JSON."""
    config = json.loads(json.dumps(model_config))  # tuples -> lists, as config.json holds them
    canonical = json.dumps({"model": model_name, "model_config": config}, sort_keys=True, separators=(",", ":"))
    return {"model": model_name, "model_config": config,
            "sha256": hashlib.sha256(canonical.encode()).hexdigest()}


def config_mismatch(saved: dict | None, model_name: str, model_config: dict, defaults: dict,
                    weights: str = "the weights") -> str | None:
    """How the model config the weights were saved with (``saved``, from ``model_config_metadata``) differs from
    the one config.json describes now: "model_config.likelihood is 'gaussian' in config.json, 'bernoulli' in
    model.safetensors" (``weights`` names the file), or None when they agree or the weights predate fingerprints.
    ``defaults`` (the config class's field defaults) stand in for fields added after the weights were saved, so
    older runs keep loading."""
    if not isinstance(saved, dict) or "sha256" not in saved:
        return None  # written before weights carried their config: nothing to compare
    mine = model_config_metadata(model_name, model_config)
    if saved["sha256"] == mine["sha256"]:
        return None
    if saved.get("model") != model_name:
        return f"model is {model_name!r} in config.json, {saved.get('model')!r} in {weights}"
    theirs, defaults = saved.get("model_config"), json.loads(json.dumps(defaults, default=str))
    if not isinstance(theirs, dict):
        return f"{weights} carry another model config"
    for key in sorted(mine["model_config"]):
        value = mine["model_config"][key]
        if key in theirs and theirs[key] != value or key not in theirs and key in defaults and defaults[key] != value:
            return f"model_config.{key} is {value!r} in config.json, {theirs.get(key, defaults.get(key))!r} in " \
                   f"{weights}"
    return None  # only fields added since (at their defaults) or removed since differ


def dtype_mismatches(tensors: dict[str, torch.Tensor], expected: dict[str, torch.dtype]) -> list[tuple[str, str, str]]:
    """``(name, found, expected)`` of every tensor whose dtype is not the model's own, in order (a float16 or int32
    copy would be cast silently by load_state_dict)."""
    return [(name, str(tensors[name].dtype).replace("torch.", ""), str(dtype).replace("torch.", ""))
            for name, dtype in expected.items() if name in tensors and tensors[name].dtype != dtype]


def tensors_misfit(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, prefix: str = "",
                   held_in: str = "the weights", needs: str = "the model config.json describes"
                   ) -> tuple[str, str] | None:
    """The first way saved ``tensors`` do not fit a model's state dict ``expected``, as ``(kind, phrase)`` with kind
    "names", "shape" or "dtype" (checked in that order); None when they fit. One phrase, not torch's dump of every
    tensor, and a dtype is never cast silently."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        return "names", (f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. "
                         f"{unexpected[:3]}")
    shapes = [(k, list(tensors[k].shape), list(v.shape)) for k, v in expected.items() if tensors[k].shape != v.shape]
    if shapes:
        name, got, want = shapes[0]
        more = f" (and {len(shapes) - 1} more tensor(s) differ)" if len(shapes) > 1 else ""
        return "shape", f"tensor '{prefix}{name}' has shape {got} in {held_in} but {needs} needs {want}{more}"
    dtypes = dtype_mismatches(tensors, {k: v.dtype for k, v in expected.items()})
    if dtypes:
        name, found, want = dtypes[0]
        more = f" (and {len(dtypes) - 1} more tensor(s))" if len(dtypes) > 1 else ""
        return "dtype", (f"tensor '{prefix}{name}' is {found}, expected {want} (the dtype elbolab trains and "
                         f"saves){more}")
    return None


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"expected {path} to exist; train first, or check the run folder path")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from None
    return tensors, (json.loads(meta["json"]) if "json" in meta else None)


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """``(name, NaN count, inf count)`` of every floating-point tensor holding a NaN or an infinity, in order."""
    found = []
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            found.append((name, int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())))
    return found


def describe_nonfinite(found: list[tuple[str, int, int]]) -> str:
    """'tensor 'decoder.0.weight' holds 3 NaN value(s) (and 2 more tensors)' for ``nonfinite_tensors``' answer."""
    name, n_nan, n_inf = found[0]
    counts = " and ".join(f"{n} {kind} value(s)" for n, kind in ((n_nan, "NaN"), (n_inf, "infinite")) if n)
    more = f" (and {len(found) - 1} more tensor(s))" if len(found) > 1 else ""
    return f"tensor {name!r} holds {counts}{more}"


def read_metrics(path) -> tuple[list[dict], list[int]]:
    """The records of a metrics.jsonl file, and the numbers (counting from 1) of the lines that are not a JSON
    object: a line cut short by a killed process, a hand edit. Those lines are skipped, blank lines ignored; a
    missing file gives ``([], [])``. Bytes that are not UTF-8 make their line unreadable, never the whole file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return [], []
    except OSError as error:
        raise CheckpointError(f"could not read {path} ({error.strerror or error}); check its permissions") from None
    records, bad = [], []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # json.JSONDecodeError, or a number too long to parse
            record = None
        if isinstance(record, dict) and "\ufffd" not in line:
            records.append(record)
        else:
            bad.append(number)
    return records, bad
