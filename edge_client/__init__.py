"""fedkeys edge_client package."""
