"""Perception networks and their pre/post-processing: ppn (LiDAR BEV), detector, florence2."""
