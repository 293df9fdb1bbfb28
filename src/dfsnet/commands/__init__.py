"""Sub-commands of the ``dfsnet`` CLI, one module per group; each exposes ``register(subparsers)``."""
