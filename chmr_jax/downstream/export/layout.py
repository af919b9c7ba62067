"""The export's layout: formats, file names and the plan version (shared by the writers, the run and the reader).
(Moved unchanged from downstream/export.py; the package's docstring describes the export.)"""
from __future__ import annotations

FORMATS = ("numpy", "parquet", "tfds")
ALIASES = {"npz": "numpy"}   # the format's name before outputs were sharded
TFDS_NAME = "chmr_embeddings"
TFDS_DIR = f"tfds/{TFDS_NAME}/1.0.0"
STRINGS = ("id", "smiles", "key")
BUDGET_SAMPLE = 2048          # input rows whose molecules size the padding budget
PLAN_VERSION = 1

FILES = {"numpy": "numpy/<array>-<shard>.npy", "parquet": "parquet/part-<shard>.parquet", "tfds": TFDS_DIR}
