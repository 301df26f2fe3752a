"""Parallel Perception Network experts: BEV segmentation and reconstruction from LiDAR.

``networks`` (torch modules, four sizes), ``training`` (``moesaic train ppn``), ``serving``
(the ``ppn_bev`` processor: raw points in, BEV outputs out) and ``commands`` (CLI).
Importing this package imports neither torch nor open3d.
"""

__all__: list[str] = []
