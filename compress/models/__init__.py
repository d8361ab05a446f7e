"""Model factories for real pretrained models (optional extras; the small zoo is ``compress.zoo``)."""
