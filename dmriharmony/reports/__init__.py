"""dmriharmony.reports."""
