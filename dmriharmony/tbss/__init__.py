"""dmriharmony.tbss."""
