"""Is a local model complete? Cheap checks of its files before transformers reads them.

A partial download or a truncated copy otherwise fails deep inside transformers with a message
about something else ("You need to have sentencepiece or tiktoken installed" for a folder
holding only config.json; "When changing to a larger dtype, its size must be a divisor..." for
a short .gguf). Each check reads headers and sizes only (no weights), and raises a ValueError
naming the missing or short file and what to do.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

REFETCH = "a partial download or copy? fetch the model again"

# any one of these lets transformers build a tokenizer (tokenizer_config.json alone suffices for
# byte-level tokenizers such as ByT5)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")


def check_model_dir(path: Path) -> None:
    """A Hugging Face model directory (config.json already checked): tokenizer files and
    weights present, each weight file as long as its header says."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise ValueError(f"model directory {path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES[:4])}, "
                         f"...): {REFETCH}")
    if (path / "tokenizer.json").is_file():
        _check_json(path / "tokenizer.json")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(_check_json(index).get("weight_map", {}).values()))
            for shard in shards:
                if not (path / shard).is_file():
                    raise ValueError(f"model directory {path} lacks {shard}, a weight shard {index_name} lists: "
                                     f"{REFETCH}")
                _check_weights(path / shard)
            return
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if not weights:
        raise ValueError(f"model directory {path} has no weights (model.safetensors or pytorch_model.bin): "
                         f"{REFETCH}")
    for w in weights:
        _check_weights(w)


def _check_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path} is truncated or not JSON ({path.stat().st_size} bytes): {REFETCH}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object: {REFETCH}")
    return data


def _check_weights(path: Path) -> None:
    if path.suffix == ".safetensors":
        _check_safetensors(path)
    elif path.suffix == ".bin":
        with path.open("rb") as fh:
            start = fh.read(4)
        # torch.save writes a zip whose directory is at the end, so a cut file lacks it; a legacy
        # (pickle) .bin cannot be checked this cheaply and is left to torch
        if not start or (start == b"PK\x03\x04" and not zipfile.is_zipfile(path)):
            raise ValueError(f"{path} is truncated or damaged ({path.stat().st_size} bytes, not a complete "
                             f"torch archive): {REFETCH}")


def _check_safetensors(path: Path) -> None:
    """8 bytes of header length, a JSON header, then the data its offsets point into."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise ValueError(f"{path} is truncated ({size} bytes, shorter than its own header): {REFETCH}")
        try:
            header = json.loads(fh.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{path} is damaged (its header is not safetensors JSON): {REFETCH}") from None
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: {size} bytes where its header needs {8 + n + end}: {REFETCH}")


def check_gguf(path: Path) -> None:
    """A .gguf file: the magic, a header that parses, and every tensor inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'): {REFETCH}")
    try:
        from gguf import GGUFReader
    except ImportError:  # transformers then says that gguf is needed
        return
    try:
        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # noqa: BLE001 - any parse failure of a cut file: name the file, not numpy
        raise ValueError(f"{path} is truncated or damaged ({size} bytes; {type(exc).__name__} reading it): "
                         f"{REFETCH}") from None
    if end > size:
        raise ValueError(f"{path} is truncated: {size} bytes where its tensors need {end}: {REFETCH}")


# --------------------------------------------------------------------------- GGUF: dequantized once

def gguf_cache_root(setting: str) -> Path | None:
    """Where ``model.gguf_cache`` keeps dequantized copies: ``auto``/``on``: ``$RLFUSE_CACHE``
    (default ``~/.cache/rlfuse``); ``off``: nowhere (the .gguf is read on every load); else a folder."""
    import os

    if setting == "off":
        return None
    if setting in ("auto", "on"):
        return Path(os.environ.get("RLFUSE_CACHE") or Path.home() / ".cache" / "rlfuse")
    return Path(setting).expanduser()


def _gguf_key_dir(gguf: Path, root: Path) -> Path:
    st = gguf.stat()  # the file's name, size and mtime: a changed file gets a fresh copy
    return root / "models" / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished folder into place; a copy another process published first wins."""
    import shutil

    try:
        tmp.rename(out)
    except OSError:
        if not out.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def cached_gguf_tokenizer(gguf: Path, root: Path, trust_remote_code: bool = False):
    """The tokenizer of a .gguf file, read from it once (~4 s for SmolLM2) and then from the cache."""
    import os

    from transformers import AutoTokenizer

    out = _gguf_key_dir(gguf, root) / "tokenizer"
    if not (out / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=trust_remote_code)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(tmp)
        _publish(tmp, out)
    return AutoTokenizer.from_pretrained(str(out), trust_remote_code=trust_remote_code)


def dequantized_gguf(gguf: Path, dtype, root: Path, trust_remote_code: bool = False) -> tuple[Path, bool]:
    """(folder, made now): a safetensors copy of a .gguf model's weights in ``dtype``, keyed by the
    file and the dtype. transformers' ``gguf_file=`` dequantizes every tensor on each load (~20 s
    of CPU for SmolLM2-135M and ~1 GB of buffers); the copy loads memory-mapped in under a second."""
    import os

    from transformers import AutoModelForCausalLM

    gguf = Path(gguf)
    out = _gguf_key_dir(gguf, root) / str(dtype).removeprefix("torch.")
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out, False
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    model.hf_quantizer = None  # plain tensors now: drop the gguf marker so they can be saved
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(f"{gguf} dequantized to {dtype} by rlfuse (model.gguf_cache)\n")
    _publish(tmp, out)
    del model
    from .memory import release_memory

    release_memory()  # the GGUF reader's buffers and the dequantized model are not needed again
    return out, True
