"""dmriharmony.simulate."""
