"""The dfsnet web service: ``create_app(index_dir_or_pipeline)`` returns a FastAPI application;
``dfsnet serve INDEX_DIR`` runs it with uvicorn."""
from dfsnet.web.app import DEFAULT_ALLOWED_HOSTS, DEFAULT_MAX_UPLOAD_BYTES, create_app

__all__ = ["create_app", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_ALLOWED_HOSTS"]
