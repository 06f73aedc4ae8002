"""dmriharmony.evaluation."""
