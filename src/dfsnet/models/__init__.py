"""CNN backbones on timm, the DFS module, DFS-Net and its checkpoints.

>>> from dfsnet.models import create_backbone, DFSNet
>>> net = DFSNet(create_backbone("efficientnet_lite0", pretrained=True), num_classes=10)
"""
from dfsnet.models.backbones import (
    BACKBONE_ALIASES,
    DEFAULT_BACKBONE,
    Backbone,
    ModelMeta,
    create_backbone,
    list_backbones,
)
from dfsnet.models.checkpoint import checkpoint_hash, load_checkpoint, read_checkpoint_meta, save_checkpoint
from dfsnet.models.network import DFSModule, DFSNet, DFSNetMeta, dfs_branch_widths

__all__ = [
    "BACKBONE_ALIASES",
    "DEFAULT_BACKBONE",
    "Backbone",
    "DFSModule",
    "DFSNet",
    "DFSNetMeta",
    "ModelMeta",
    "checkpoint_hash",
    "create_backbone",
    "dfs_branch_widths",
    "list_backbones",
    "load_checkpoint",
    "read_checkpoint_meta",
    "save_checkpoint",
]
