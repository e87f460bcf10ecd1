"""fedkeys model_export package."""
