"""CTR backbones (deepctr-torch), the knowledge adaptor, training and the report."""
