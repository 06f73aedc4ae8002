"""dmriharmony.interfaces."""
