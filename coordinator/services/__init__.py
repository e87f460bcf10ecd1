"""Business logic of the coordinator: keyword-only functions called by the routes."""
