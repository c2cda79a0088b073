"""One augmenter per task: entities, context, template, response schema, parser."""
