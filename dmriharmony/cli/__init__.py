"""dmriharmony.cli."""
