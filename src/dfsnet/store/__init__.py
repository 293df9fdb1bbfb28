"""The image index: one folder holding a model, an encoder, Hamming codes and image metadata.

- :mod:`~dfsnet.store.manifest`: the folder layout and its commit point.
- :mod:`~dfsnet.store.metadata`: per-generation SQLite metadata.
- :mod:`~dfsnet.store.files`: the checks of every load (sizes, headers, checksums).
- :mod:`~dfsnet.store.lock`: the write lock and garbage collection.
- :mod:`~dfsnet.store.builder`: extract, encode, commit a generation.
- :mod:`~dfsnet.store.maintenance`: remove, prune and repair.
- :mod:`~dfsnet.store.verify`: full checks of an index on disk.
- :mod:`~dfsnet.store.unsupervised`: indexing without labels (a pretrained backbone, ITQ on the
  collection) and the backbone checkpoint an index then holds.
- :mod:`~dfsnet.store.image_index`: the :class:`ImageIndex` facade.
"""
from dfsnet.store.builder import AddReport
from dfsnet.store.image_index import ImageIndex, SearchHit
from dfsnet.store.maintenance import (
    OnnxReport,
    PruneReport,
    RemoveReport,
    RepairReport,
    add_onnx_graph,
    prune_index,
    remove_images,
    repair_index,
)
from dfsnet.store.manifest import FORMAT_VERSION, IndexDamagedError, read_manifest
from dfsnet.store.metadata import ImageRecord
from dfsnet.store.verify import VerifyReport, verify_index

__all__ = ["ImageIndex", "SearchHit", "AddReport", "VerifyReport", "ImageRecord", "read_manifest",
           "verify_index", "FORMAT_VERSION", "IndexDamagedError", "RemoveReport", "PruneReport", "RepairReport",
           "OnnxReport", "remove_images", "prune_index", "repair_index", "add_onnx_graph"]
