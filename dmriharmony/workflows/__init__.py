"""dmriharmony.workflows."""
