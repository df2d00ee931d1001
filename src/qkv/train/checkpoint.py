"""Model folders: ``config.json`` + ``model.safetensors`` + tokenizer + ``training_state.pt``.

A model folder is what ``qkv train`` writes and ``qkv translate`` / ``qkv evaluate`` read::

    out/
      config.json          {"format": "qkv-model", "task": ..., "model": {...}, "training": {...}}
      model.safetensors    weights (no pickle: loading a model never runs code)
      tokenizer.json       (+ target_tokenizer.json when the vocabularies are separate)
      training_state.pt    optimizer, scheduler, step, RNG states, data position, best metric

Writing is atomic per file and ordered: every file is written in a staging folder inside the
model folder, flushed and fsynced; the staging folder is then renamed to ``.commit-*`` (the
commit point) and its files are moved into place with ``os.replace`` (atomic on POSIX),
``config.json`` last, and the folder itself is fsynced. A crash before the commit point leaves
the previous checkpoint (the staging folder is discarded by the next save); a crash after it is
rolled forward by the next :func:`prepare_output_folder` or save, so the folder never stays at
mixed steps. The step recorded in ``model.safetensors`` and ``training_state.pt`` is checked
against ``config.json`` on resume all the same.

The training state is loaded with ``torch.load(weights_only=True)``: tensors and plain Python
values only, nothing is unpickled into code.

One writer per folder: :func:`prepare_output_folder` (and every save) takes an exclusive
``flock`` on the folder's lock file (:func:`lock_file_of`, in the temporary directory, so
nothing is created in or beside the folder), held until the process exits or calls
:func:`release_output_folder`. A second training into the same folder is refused with a message
naming the process that holds it; the operating system drops the lock of a process that dies
(even by SIGKILL), so a stale lock file never blocks anyone. A full disk during a save raises
``OSError`` saying "no space left on device" with the folder; the previous checkpoint stays.

Reading checks before trusting: the ``model.safetensors`` header is parsed and checked against
the file's size (a truncated, empty or foreign file is named as such), and :func:`load_model`
builds the model on PyTorch's ``meta`` device first, so a config whose shapes do not match the
weights (a 2e9-token vocabulary) is refused before any memory is allocated.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from qkv._version import __version__

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "ModelFolderError",
    "check_config_against_weights",
    "is_model_folder",
    "load_model",
    "load_training_state",
    "load_weights",
    "lock_file_of",
    "prepare_output_folder",
    "read_config",
    "read_weights_header",
    "release_output_folder",
    "save_model_folder",
]

logger = logging.getLogger(__name__)

FORMAT = "qkv-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
_STAGING_PREFIX = ".staging-"
_COMMIT_PREFIX = ".commit-"
LOCK_FILE = ".qkv-lock"
_SAFETENSORS_INSTALL = "pip install 'safetensors>=0.4'  (or: pip install -e '.[tasks]')"


class ModelFolderError(ValueError):
    """A model folder that cannot be used: missing, not a qkv model, or inconsistent. The
    message names the folder or file and what is wrong."""


class SavesToFolder(Protocol):
    """A tokenizer (or anything) that writes its files into a folder, e.g.
    :class:`qkv.data.PairTokenizer`."""

    def save(self, directory: str | os.PathLike[str]) -> None: ...


# --------------------------------------------------------------------------------------------
# Checking a folder before training into it


def _entries(path: Path) -> list[str]:
    return [
        p.name
        for p in path.iterdir()
        if not p.name.startswith((_STAGING_PREFIX, _COMMIT_PREFIX)) and p.name != LOCK_FILE
    ]


# --------------------------------------------------------------------------------------------
# One writer per folder

_HELD_LOCKS: dict[str, tuple[int, Path]] = {}  # resolved folder -> (lock descriptor, lock file)


def lock_file_of(folder: str | os.PathLike[str]) -> Path:
    """The lock file of a model folder: in a ``qkv-locks`` folder of the system's temporary
    directory, named after the folder's resolved path, so that taking the lock creates nothing
    in (or beside) the user's folders."""
    resolved = Path(folder).resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:24]
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in resolved.name)[:40]
    return Path(tempfile.gettempdir()) / "qkv-locks" / f"{readable}-{digest}.lock"


def _lock_directory(file: Path) -> None:
    """Create the shared lock folder, writable by every user (sticky, like /tmp itself)."""
    if not file.parent.is_dir():
        file.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # another user's folder: it has its mode already
            os.chmod(file.parent, 0o1777)


def _lock_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "another process"


def _is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` job (``RANK``), or of a process group the caller set up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _lock_output_folder(folder: Path) -> None:
    """Take the folder's exclusive lock for this process (reentrant; a no-op where ``flock``
    does not exist, and on the non-main processes of a ``torchrun`` job, which never write)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    if not _is_main_process():
        return
    key = str(folder.resolve())
    if key in _HELD_LOCKS:
        return
    file = lock_file_of(folder)
    _lock_directory(file)
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise ModelFolderError(
                f"{folder}: another qkv run is writing into this folder ({holder}); wait for "
                "it to finish, stop it, or choose another --out"
            ) from None
        try:  # the holder we waited on may have removed the file: lock the one now there
            same = os.fstat(fd).st_ino == os.stat(file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    command = " ".join(sys.argv)[:200]
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}: {command}\n".encode())
    _HELD_LOCKS[key] = (fd, file)


def release_output_folder(path: str | os.PathLike[str]) -> None:
    """Give up this process's lock on ``path`` (taken by :func:`prepare_output_folder` or a
    save) and remove its lock file; without a call this happens when the process exits (a
    killed process leaves the file, but the operating system has dropped its lock)."""
    held = _HELD_LOCKS.pop(str(Path(path).resolve()), None)
    if held is not None:
        fd, file = held
        file.unlink(missing_ok=True)  # while still holding it: nobody can take a stale inode
        os.close(fd)  # closing the descriptor releases the flock


@atexit.register
def _release_all_locks() -> None:
    for key in list(_HELD_LOCKS):
        release_output_folder(key)


def is_model_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a ``config.json`` written by :func:`save_model_folder`."""
    try:
        read_config(path)
    except ModelFolderError:
        return False
    return True


def prepare_output_folder(
    path: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False
) -> None:
    """Check that training may write into ``path``, before any training time is spent.

    Args:
        path: the output folder.
        resume: the run continues the checkpoint in ``path`` (which must then exist).
        overwrite: a qkv model folder there may be replaced by a new run.

    Raises:
        ModelFolderError: ``path`` is a file; another qkv process is writing into it (the
            message names it); is non-empty and not a qkv model folder (never written into,
            whatever the flags: it holds someone's other files); holds a model and neither
            flag is given; or ``resume`` without a training state there.

    On success this process holds the folder's lock (see the module docstring).
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ModelFolderError(f"{folder}: exists and is not a folder")
    _lock_output_folder(folder)  # before looking: another run may be writing right now
    try:
        if folder.is_dir():
            _finish_interrupted_commits(folder)
        _check_output_folder(folder, resume=resume, overwrite=overwrite)
    except ModelFolderError:
        release_output_folder(folder)
        raise


def _check_output_folder(folder: Path, *, resume: bool, overwrite: bool) -> None:
    occupied = folder.is_dir() and bool(_entries(folder))
    if occupied and not is_model_folder(folder):
        raise ModelFolderError(
            f"{folder}: not empty and not a qkv model folder (no qkv config.json); "
            "refusing to write into it: choose a new or empty folder"
        )
    if resume:
        if not (folder / STATE_FILE).is_file() or not occupied:
            raise ModelFolderError(f"{folder}: nothing to resume (no {STATE_FILE} there)")
        return
    if occupied and not overwrite:
        raise ModelFolderError(
            f"{folder}: already holds a qkv model; pass --resume to continue its training "
            "or --overwrite to start again from scratch"
        )


# --------------------------------------------------------------------------------------------
# Writing


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_finite(model: nn.Module, folder: Path) -> None:
    """Refuse weights with NaN or inf: saving them would replace a usable checkpoint."""
    named = list(model.state_dict().items())
    floats = [(n, t) for n, t in named if t.is_floating_point()]
    if not floats:
        return
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats]).tolist()
    bad = [n for (n, _), ok in zip(floats, finite, strict=True) if not ok]
    if bad:
        raise ModelFolderError(
            f"{folder}: refusing to save non-finite weights ({len(bad)} tensors with NaN or "
            f"inf, e.g. {', '.join(bad[:3])}); the folder keeps its previous checkpoint"
        )


def _write_weights(model: nn.Module, file: Path, step: int) -> None:
    try:
        from safetensors.torch import save_model
    except ImportError:
        raise ModuleNotFoundError(
            f"saving a model needs safetensors, which is not installed; run: {_SAFETENSORS_INSTALL}"
        ) from None
    # save_model (not save_file) drops the duplicate names of tied weights.
    save_model(model, str(file), metadata={"step": str(step), "format": FORMAT})


def _write_config(config: dict[str, Any], files: list[str], step: int, file: Path) -> None:
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qkv_version": __version__,
        "step": step,
        "files": sorted(files),
        **config,
    }
    file.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _stage(
    staging: Path,
    *,
    model: nn.Module,
    config: dict[str, Any],
    tokenizer: SavesToFolder | None,
    training_state: dict[str, Any] | None,
    step: int,
) -> list[str]:
    """Write every file into ``staging``; return their names, ``config.json`` last."""
    _write_weights(model, staging / WEIGHTS_FILE, step)
    if tokenizer is not None:
        tokenizer.save(staging)
    if training_state is not None:
        torch.save({**training_state, "step": step}, staging / STATE_FILE)
    names = sorted(p.name for p in staging.iterdir())
    _write_config(config, [*names, CONFIG_FILE], step, staging / CONFIG_FILE)
    return [*names, CONFIG_FILE]


def save_model_folder(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    config: dict[str, Any],
    tokenizer: SavesToFolder | None = None,
    training_state: dict[str, Any] | None = None,
    step: int = 0,
) -> Path:
    """Write a model folder atomically (see the module docstring).

    Args:
        path: the folder (created if missing; check it first with
            :func:`prepare_output_folder`).
        model: the module whose ``state_dict`` is saved (unwrap DDP first).
        config: JSON-ready sections, e.g. ``{"task": ..., "model": ..., "training": ...}``;
            ``"model"`` must hold what rebuilds the model.
        tokenizer: written with ``tokenizer.save(folder)``.
        training_state: what :func:`load_training_state` returns on resume.
        step: the optimizer step, recorded in every file for the consistency check.

    Returns:
        The folder.
    """
    folder = Path(path)
    _check_finite(model, folder)
    folder.mkdir(parents=True, exist_ok=True)
    _lock_output_folder(folder)
    _finish_interrupted_commits(folder)
    _remove_stale_staging(folder)
    try:
        _save_staged(folder, model, config, tokenizer, training_state, step)
    except OSError as error:
        if error.errno == errno.ENOSPC or _is_disk_full(error):
            raise OSError(
                errno.ENOSPC,
                f"no space left on device while saving the step-{step} checkpoint into "
                f"{folder}; the previous checkpoint there is intact. Free some space and "
                "resume with --resume",
            ) from None
        raise
    logger.info("saved model folder %s (step %d)", folder, step)
    return folder


def _is_disk_full(error: BaseException) -> bool:
    """safetensors reports a full disk as its own error with the OS code inside the text."""
    text = str(error)
    return "No space left on device" in text or "StorageFull" in text


def _save_staged(
    folder: Path,
    model: nn.Module,
    config: dict[str, Any],
    tokenizer: SavesToFolder | None,
    training_state: dict[str, Any] | None,
    step: int,
) -> None:
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=folder))
    try:
        names = _stage(
            staging,
            model=model,
            config=config,
            tokenizer=tokenizer,
            training_state=training_state,
            step=step,
        )
        previous = _previous_files(folder)
        mode = _file_mode()
        for name in names:
            os.chmod(staging / name, mode)  # safetensors writes 0600; the rest are 0644
            _fsync_file(staging / name)
        _fsync_dir(staging)
        # The commit point: once the staging folder is renamed, the new checkpoint is complete
        # on disk, and a crash while its files are moved into place is finished on the next
        # use of the folder (_finish_interrupted_commits) instead of leaving mixed steps.
        commit = folder / (_COMMIT_PREFIX + staging.name.removeprefix(_STAGING_PREFIX))
        os.replace(staging, commit)
        _fsync_dir(folder)
        staging = commit
        _move_into_place(commit, folder, names)
        for name in previous - set(names):  # e.g. a target vocabulary no longer separate
            (folder / name).unlink(missing_ok=True)
        _fsync_dir(folder)
    except Exception as error:
        if _is_disk_full(error) and not isinstance(error, OSError):
            raise OSError(errno.ENOSPC, str(error)) from error
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(commit: Path, folder: Path, names: list[str]) -> None:
    """Replace the folder's files by the committed ones, ``config.json`` last (it is what makes
    the folder a model folder, and it records the step)."""
    for name in sorted(names, key=lambda n: n == CONFIG_FILE):
        if (commit / name).exists():
            os.replace(commit / name, folder / name)


def _finish_interrupted_commits(folder: Path) -> None:
    """Roll forward a save that was killed after its commit point (its files partly moved):
    the rest of its files go into place, so the folder holds one consistent step again."""
    for commit in sorted(folder.glob(_COMMIT_PREFIX + "*")):
        names = [p.name for p in commit.iterdir() if p.is_file()]
        _move_into_place(commit, folder, names)
        shutil.rmtree(commit, ignore_errors=True)
        _fsync_dir(folder)
        logger.warning("finished the interrupted save in %s", folder)


def _file_mode() -> int:
    """``0o666`` less the process's umask: the mode ``open()`` gives a new file (0644 usually)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _previous_files(folder: Path) -> set[str]:
    try:
        files = read_config(folder).get("files", [])
    except ModelFolderError:
        return set()
    # Only plain names this module wrote: never follow a path out of the folder.
    return {f for f in files if isinstance(f, str) and f == Path(f).name}


def _remove_stale_staging(folder: Path) -> None:
    for leftover in folder.glob(_STAGING_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Reading


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a model folder.

    Raises:
        ModelFolderError: no folder, no ``config.json``, invalid JSON, or not written by qkv.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such model folder")
    file = folder / CONFIG_FILE
    if not file.is_file():
        nested = [p.parent for p in sorted(folder.glob(f"*/{CONFIG_FILE}"))][:1]
        hint = f"; did you mean {nested[0]}?" if nested else ""  # e.g. qkv-demo/model
        raise ModelFolderError(f"{folder}: not a qkv model folder (no {CONFIG_FILE}){hint}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFolderError(f'{file}: not a qkv model config (no "format": "{FORMAT}")')
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFolderError(
            f"{file}: format_version {config['format_version']} is newer than this qkv "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade qkv"
        )
    return config


_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def read_weights_header(path: str | os.PathLike[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The ``name -> (dtype, shape)`` table of a folder's ``model.safetensors``, read from its
    header alone and checked against the file's size (nothing is allocated).

    Raises:
        ModelFolderError: the file is missing, empty, truncated or not a safetensors file,
            naming the file and what is wrong.
    """
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise ModelFolderError(f"{Path(path)}: no {WEIGHTS_FILE}")
    size = file.stat().st_size
    if size < 8:
        raise ModelFolderError(
            f"{file}: empty or truncated ({size} bytes; a safetensors file starts with an "
            "8-byte header length)"
        )
    with file.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise ModelFolderError(
                f"{file}: truncated or not a safetensors file (its header claims {length:,} "
                f"bytes; the file has {size:,})"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFolderError(f"{file}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{file}: not a safetensors file (its header is not a table)")
    data_bytes = size - 8 - length
    table: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFolderError(f"{file}: malformed header entry for {name!r}") from None
        expected = math.prod(shape) * _DTYPE_BYTES.get(dtype, 0)
        if dtype not in _DTYPE_BYTES or min(shape, default=0) < 0 or end - begin != expected:
            raise ModelFolderError(
                f"{file}: malformed header entry for {name!r} ({dtype} {list(shape)}, bytes "
                f"{begin}..{end})"
            )
        if begin < 0 or end > data_bytes:
            raise ModelFolderError(
                f"{file}: truncated ({name!r} needs bytes up to {end:,} of the data, which has "
                f"{data_bytes:,})"
            )
        table[name] = (dtype, shape)
    return table


def _check_shapes(
    model: nn.Module, table: dict[str, tuple[str, tuple[int, ...]]], file: Path
) -> None:
    """Every tensor of the file fits the model's tensor of the same name."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, (_, shape) in table.items():
        if name in expected and expected[name] != shape:
            raise ModelFolderError(
                f"{file}: does not fit the model in config.json: {name!r} has shape "
                f"{list(shape)} where the model needs {list(expected[name])}"
            )
    missing = sorted(set(expected) - set(table))
    unexpected = sorted(set(table) - set(expected))
    if unexpected:
        raise ModelFolderError(
            f"{file}: does not fit the model in config.json, which has no "
            f"{', '.join(unexpected[:5])}"
        )
    # Names missing from the file may be tied weights save_model dropped; load_model decides.
    del missing


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> int:
    """Load ``model.safetensors`` into ``model`` (strict: every name must match).

    Returns:
        The step recorded in the file.

    Raises:
        ModelFolderError: the file is missing, empty, truncated, not a safetensors file, or
            does not fit the model.
    """
    from safetensors import safe_open
    from safetensors.torch import load_model

    file = Path(path) / WEIGHTS_FILE
    _check_shapes(model, read_weights_header(path), file)
    try:
        load_model(model, str(file), strict=True, device="cpu")
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except (RuntimeError, OSError) as error:
        raise ModelFolderError(f"{file}: does not fit the model in config.json ({error})") from None
    except Exception as error:  # safetensors' own error type for a corrupt file
        raise ModelFolderError(f"{file}: cannot be read ({error})") from None
    try:
        return int(metadata.get("step", -1))
    except ValueError:
        raise ModelFolderError(f"{file}: its step is not a number") from None


def load_training_state(
    path: str | os.PathLike[str], *, expected_step: int | None = None
) -> dict[str, Any]:
    """The training state saved beside the weights (tensors and plain values only).

    Args:
        path: the model folder.
        expected_step: the step of ``config.json`` / the weights; a different step in the state
            means an interrupted write, which is refused.

    Raises:
        ModelFolderError: missing, unreadable, or from another step.
    """
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise ModelFolderError(f"{Path(path)}: no {STATE_FILE} (nothing to resume)")
    try:
        state: dict[str, Any] = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise ModelFolderError(f"{file}: cannot be read as a training state ({error})") from None
    if expected_step is not None and state.get("step") != expected_step:
        raise ModelFolderError(
            f"{file}: holds step {state.get('step')} but the weights are from step "
            f"{expected_step} (an interrupted save?); cannot resume exactly"
        )
    return state


def load_model(
    path: str | os.PathLike[str],
    build: Callable[[dict[str, Any]], nn.Module],
    *,
    config: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a folder: ``build(config["model"])`` then its weights
    (``config``: the folder's ``config.json`` when the caller has read it already).

    Returns:
        The model (on the CPU, in eval mode) and the whole ``config.json``.

    Raises:
        ModelFolderError: see :func:`read_config` and :func:`load_weights`; also a config
            without a ``"model"`` section or one ``build`` rejects, or one whose shapes do not
            match the weights (found before the model is allocated).
    """
    config = read_config(path) if config is None else config
    if not isinstance(config.get("model"), dict):
        raise ModelFolderError(f'{Path(path) / CONFIG_FILE}: no "model" section')
    check_config_against_weights(path, build, config)
    try:
        model = build(config["model"])
    except (ValueError, TypeError, KeyError) as error:
        raise ModelFolderError(f"{Path(path) / CONFIG_FILE}: bad model config: {error}") from None
    load_weights(model, path)
    return model.eval(), config


def check_config_against_weights(
    path: str | os.PathLike[str],
    build: Callable[[dict[str, Any]], nn.Module],
    config: dict[str, Any] | None = None,
) -> None:
    """Build the model of ``config.json`` on the ``meta`` device (no memory) and check its
    tensor shapes against the weights' header, so a config that does not match its weights
    (say a 2e9-token vocabulary) is refused before anything is allocated.

    Raises:
        ModelFolderError: the weights file is unreadable or the shapes differ.
    """
    config = read_config(path) if config is None else config
    table = read_weights_header(path)
    try:
        with torch.device("meta"):
            probe = build(config["model"])
    except (ValueError, TypeError, KeyError) as error:
        raise ModelFolderError(f"{Path(path) / CONFIG_FILE}: bad model config: {error}") from None
    except Exception:  # a model that cannot be built on meta: the real load still checks
        return
    _check_shapes(probe, table, Path(path) / WEIGHTS_FILE)
