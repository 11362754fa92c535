"""prefloop: self-improving preference data. The library; it knows nothing of Prefect."""
