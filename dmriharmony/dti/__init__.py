"""dmriharmony.dti."""
