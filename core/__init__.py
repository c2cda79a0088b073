"""The ground layer: config models, durable storage, the lock, crash points, memory release, spill
files, packaged assets, hashing, time parsing, the offline switch and the progress-bar policy.

It imports nothing from the rest of recaug (the layer contract in .importlinter checks it), so every
other layer can build on it: core <- schemas <- prompts <- augmenters | encoders <- ctr_models <- pipelines.
"""
