"""fedkeys simulator package."""
