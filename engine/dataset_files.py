"""Datasets that are not JSONL, read through the ``datasets`` library.

    a folder written by ``save_to_disk``   (a Dataset, or a DatasetDict: one split is read)
    a folder of data files                 (``load_dataset(folder)``: its splits by file name)
    .parquet  .arrow  .csv  .json          (one file = one split)

Which split (``data.split``, ``--split``; default: "train", or the only split there is) and
which columns hold the fields (``data.prompt_column=question`` ...) are the run's ``data``
section, set for the run by :func:`configure` (``Stage`` calls it). Rows come back as
(``"row N"``, record) like JSONL's (line, record), so every error still names file and row.
"""

from __future__ import annotations

from pathlib import Path

SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}
# canonical field <- the data.* key that may rename it
COLUMN_KEYS = {"prompt": "prompt_column", "response": "response_column", "completion": "completion_column",
               "chosen": "chosen_column", "rejected": "rejected_column", "messages": "messages_column",
               "system": "system_column", "score": "score_column"}

_options = None  # the run's DataConfig (None: defaults)


def configure(data_config) -> None:
    """Use this ``data`` config section for the datasets read from now on (one run per process)."""
    global _options
    _options = data_config


def options():
    if _options is None:
        from .config import DataConfig

        return DataConfig()
    return _options


def column_map(opts=None) -> dict[str, str]:
    """{column in the data: canonical field} for every renamed column."""
    opts = opts or options()
    renames = {}
    for canonical, key in COLUMN_KEYS.items():
        name = getattr(opts, key, None)
        if name and name != canonical:
            renames[name] = canonical
    return renames


def rename(record: dict, renames: dict[str, str]) -> dict:
    if not renames:
        return record
    out = {k: v for k, v in record.items() if k not in renames.values() or k in renames}
    for src, dst in renames.items():
        if src in record:
            out.pop(src, None)
            out[dst] = record[src]
    return out


def is_datasets_source(path: Path) -> bool:
    """Read through ``datasets`` (not the JSONL reader): a folder or a non-JSONL data file."""
    return path.is_dir() or path.suffix.lower() in SUFFIXES


def _pick_split(dd, split: str | None, where: Path):
    names = list(dd.keys())
    if split is None:
        if "train" in names or len(names) == 1:
            split = "train" if "train" in names else names[0]
        else:
            raise ValueError(f"{where}: holds splits {names}; choose one with --split or data.split")
    if split not in names:
        raise ValueError(f"{where}: no split {split!r} (it has {names}); set --split / data.split")
    return dd[split], split


def load_table(path: Path, split: str | None = None):
    """A ``datasets.Dataset`` for ``path`` (one split of it)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path}: reading this format needs the `datasets` package "
                         "(pip install 'rlfuse[engine]' or pip install datasets)") from None
    datasets.disable_progress_bars()
    if not path.is_dir() and split not in (None, "train"):
        raise ValueError(f"{path}: a single file is one split; --split {split} does not apply "
                         "(give the split's own file)")
    try:  # only the library's calls: any of its errors (ArrowInvalid is a ValueError too) is one line
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            table = datasets.load_from_disk(str(path), keep_in_memory=True)  # save_to_disk
        elif path.is_dir():
            table = datasets.load_dataset(str(path))  # a folder of data files
        elif SUFFIXES[path.suffix.lower()] == "arrow":
            table = datasets.Dataset.from_file(str(path), in_memory=True)
        else:
            reader = {"parquet": datasets.Dataset.from_parquet, "csv": datasets.Dataset.from_csv,
                      "json": datasets.Dataset.from_json}[SUFFIXES[path.suffix.lower()]]
            table = reader(str(path), keep_in_memory=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        if "corresponds to no data" in first:  # datasets' words for a file without rows
            raise ValueError(f"{path}: dataset is empty") from None
        raise ValueError(f"{path}: cannot read it as a {path.suffix or 'dataset folder'} dataset "
                         f"({type(exc).__name__}: {first})") from None
    if isinstance(table, (datasets.DatasetDict, dict)):
        return _pick_split(table, split, path)[0]
    if split not in (None, "train"):
        raise ValueError(f"{path}: a single dataset has no splits; --split {split} does not apply")
    return table


def read_rows(path, split: str | None = None) -> list[tuple[str, dict]]:
    """("row N", record) for every row (N from 0, as in the dataset); a column that
    ``data.*_column`` names but the dataset lacks is an error naming it (renaming itself happens
    for every format in ``data.read_jsonl``)."""
    p = Path(path)
    opts = options()
    table = load_table(p, split if split is not None else opts.split)
    renames = column_map(opts)
    missing = [src for src in renames if src not in table.column_names]
    if missing:
        raise ValueError(f"{p}: no column {missing[0]!r} (set by data.{COLUMN_KEYS[renames[missing[0]]]}); "
                         f"its columns are {table.column_names}")
    rows = []
    for i, record in enumerate(table):
        # parquet / arrow fill a field a row lacks with None: drop those, so a missing field reads
        # as missing (the same message as JSONL) rather than as a None value
        rows.append((f"row {i}", {k: v for k, v in record.items() if v is not None}))
    if not rows:
        raise ValueError(f"{p}: dataset is empty")
    return rows
