"""Networks and their extractors, one package per family; `models.registry` maps feature types."""
