"""Point-cloud and image IO, BEV encoding, synthetic scenes, dataset readers and metrics."""
