"""Deep feature extraction with on-disk caches.

- :func:`extract_features` / :func:`extract_features_with_mask`: pooled features
  ``float32 (n, D)`` of a dataset through ``model.features``.
- :func:`cached_feature_maps`: the backbone's feature maps, computed once (float16 on disk),
  for head-only training; :func:`extract_from_maps` pools them through the model's head.
"""
from dfsnet.features._loader import resolve_device
from dfsnet.features.extract import (
    extract_features,
    extract_features_with_mask,
    extract_from_maps,
    features_cache_path,
)
from dfsnet.features.fingerprint import dataset_fingerprint, module_fingerprint
from dfsnet.features.maps import FeatureMaps, cached_feature_maps, feature_maps_key, maps_runtime

__all__ = [
    "extract_features",
    "extract_features_with_mask",
    "extract_from_maps",
    "features_cache_path",
    "cached_feature_maps",
    "feature_maps_key",
    "maps_runtime",
    "FeatureMaps",
    "dataset_fingerprint",
    "module_fingerprint",
    "resolve_device",
]
