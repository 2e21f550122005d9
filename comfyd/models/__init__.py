"""Model catalogue: local model files with background SHA-256 hashing, plus remote backends' model lists."""

from comfyd.models.cache import MODEL_HASHES_DDL, HashCache, MemoryHashCache
from comfyd.models.catalog import ModelCatalog
from comfyd.models.remote import fetch_remote_models
from comfyd.models.scan import MODEL_EXTENSIONS, MODEL_TYPES

__all__ = [
    "MODEL_EXTENSIONS",
    "MODEL_HASHES_DDL",
    "MODEL_TYPES",
    "HashCache",
    "MemoryHashCache",
    "ModelCatalog",
    "fetch_remote_models",
]
