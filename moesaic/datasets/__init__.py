"""Point-cloud and image IO, BEV encoding, synthetic scenes, dataset readers and metrics."""

from moesaic.datasets.pointcloud import read_points

__all__ = ["read_points"]
