"""fedkeys coordinator package."""
