"""fsspec artifact store: URLs, content keys, manifests, atomic publish, shards.

Knows nothing of Prefect or of models.
"""

from storage.errors import ArtifactError, PipelineError, StoreError
from storage.keys import content_key
from storage.store import ArtifactStore, ArtifactWriter, FileEntry, Manifest, StageRef

__all__ = [
    "ArtifactError",
    "ArtifactStore",
    "ArtifactWriter",
    "FileEntry",
    "Manifest",
    "PipelineError",
    "StageRef",
    "StoreError",
    "content_key",
]
