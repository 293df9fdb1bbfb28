"""dfsnet: content-based image retrieval with deep feature selection, gain ratio and hashing."""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
