"""dmriharmony.bids."""
