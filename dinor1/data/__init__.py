"""Online data: shards -> Ray Data -> padded, normalised detection batches."""
